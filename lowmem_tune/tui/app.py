"""The dashboard app: polls a feed at a bounded rate, folds events into a `RunState`, redraws.

Training never waits on the UI: the live feed's `emit` only enqueues, and this app drains the
queue from a timer, so however fast steps come the screen is drawn in one pass at a time that a
`RedrawPacer` chooses: once a second, or less often when drawing costs more than its share of
the process (benchmarks/dashboard_overhead.py measures what that leaves the training). Keys are
handled as they come, not at the redraw rate; they reach training through `RunControl` flags
that the loop polls between steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from lowmem_tune.hardware import GpuStats
from lowmem_tune.train.control import RunControl
from lowmem_tune.tui.feeds import Feed
from lowmem_tune.tui.pacing import RedrawPacer
from lowmem_tune.tui.state import RunState
from lowmem_tune.tui.widgets import (
    EventLog,
    HeaderBar,
    LossChart,
    LossPanel,
    MemoryPanel,
    ProgressPanel,
    StrategyPanel,
    ThroughputPanel,
    log_line,
)


class HelpScreen(ModalScreen[None]):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield Static(self.text, id="help-text")

    def on_key(self) -> None:
        self.dismiss()


class DashboardApp(App[None]):
    """The dashboard of a run in this process: keys reach the training loop through `control`."""

    CSS_PATH = Path(__file__).with_name("dashboard.tcss")  # absolute, so subclasses elsewhere find it
    TITLE = "lowmem-tune"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "stop", "Stop"),
        Binding("ctrl+c", "stop", "Stop", show=False, priority=True),
        Binding("s", "checkpoint", "Checkpoint now"),
        Binding("question_mark", "help", "Help"),
    ]
    HELP = """\
[b]q[/b] / [b]ctrl+c[/b]  stop gracefully: save a checkpoint at the next step, then exit
                (resume later with `lowmem-tune run PROFILE --resume`)
[b]s[/b]           save a checkpoint now and keep training
[b]?[/b]           this help (any key closes it)

The run directory keeps everything shown here: watch it from another terminal with
`lowmem-tune monitor RUN_DIR`."""

    def __init__(self, feed: Feed, control: RunControl | None,
                 gpu_stats: Callable[[int], GpuStats | None] | None = None) -> None:
        """`control` is None when monitoring (keys cannot reach that run). `gpu_stats(index)` is
        polled while a CUDA run is live, for the NVML index the run reports for its device (NVML
        does not follow CUDA_VISIBLE_DEVICES, so cuda:N's N is not it). When the run finishes the
        app stays up showing its final state until `q`, unless the user already asked it to stop."""
        super().__init__()
        self.feed = feed
        self.control = control
        self.gpu_stats = gpu_stats
        self.state = RunState()
        self.gpu: GpuStats | None = None
        self.stopping = False
        self.pacer = RedrawPacer()
        self._last_draw_cpu: float | None = None  # the UI thread's CPU time at the last redraw
        self._next_draw = 0.0

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        with Horizontal(id="body"):
            with Vertical(id="left"):
                yield LossPanel(self.state, id="loss")
                yield StrategyPanel(id="strategy")
            with Vertical(id="right"):
                yield ProgressPanel(id="progress")
                yield ThroughputPanel(id="throughput")
                yield MemoryPanel(id="memory")
                yield EventLog(id="events", max_lines=1000, wrap=True, min_width=20)
        yield Footer()

    def on_mount(self) -> None:
        titles = {"loss": "Loss  [cyan]train[/] [magenta]eval[/]", "strategy": "Strategy", "events": "Events",
                  "progress": "Progress", "throughput": "Tokens / s", "memory": "Memory"}
        for panel_id, title in titles.items():
            self.query_one(f"#{panel_id}").border_title = title
        self.begin_capture_print(self.query_one(EventLog))
        self._redraw()
        self.set_interval(self.pacer.fastest_s, self.tick)

    def tick(self) -> None:
        """Every `fastest_s`: when the pacer says a redraw is due, poll the GPU, fold in the events
        that came and redraw."""
        now, cpu = time.monotonic(), time.thread_time()  # this runs on the UI thread: its CPU only
        if now < self._next_draw:
            return
        if self._last_draw_cpu is None:  # the first interval held the app's start-up, not a redraw
            delay = self.pacer.fastest_s
        else:
            delay = self.pacer.next_interval(cpu - self._last_draw_cpu)
        self._last_draw_cpu = cpu
        self._next_draw = now + delay - 0.1 * self.pacer.fastest_s  # the timer's jitter must not cost a whole tick
        self.poll_gpu()
        self.pull_events()

    @property
    def status(self) -> str:
        if self.stopping and self.state.finished is None:
            return "stopping"
        return self.state.status

    def pull_events(self) -> None:
        events = self.feed.drain()
        log = self.query_one(EventLog)
        for event in events:
            self.state.apply(event)
            line = log_line(event)
            if line is not None:
                log.write(line)
        if events:
            self._redraw()
            self.query_one(LossChart).redraw()
        if self.state.finished is not None and self.stopping:
            self.exit()
        elif self.feed.closed and self.state.finished is None:
            self.exit()  # the training thread ended without finishing: its error is raised after the app

    def poll_gpu(self) -> None:
        started = self.state.started
        if (self.gpu_stats is None or started is None or started.gpu_nvml_index is None
                or self.state.finished is not None):
            return
        self.gpu = self.gpu_stats(started.gpu_nvml_index)
        self.query_one(MemoryPanel).show(self.state, self.gpu)

    def _redraw(self) -> None:
        self.query_one(HeaderBar).show(self.state, self.status)
        self.query_one(LossPanel).show(self.state)
        self.query_one(ProgressPanel).show(self.state)
        self.query_one(ThroughputPanel).show(self.state)
        self.query_one(MemoryPanel).show(self.state, self.gpu)
        self.query_one(StrategyPanel).show(self.state)

    def action_stop(self) -> None:
        if self.state.finished is not None or self.feed.closed:
            self.exit()
            return
        if not self.stopping:
            self.control.request_stop()
            self.stopping = True
            self.notify("Stopping: checkpoint at the next step boundary, then exit.")
            self._redraw()
        else:
            self.notify("Already stopping: waiting for the checkpoint…")

    def action_checkpoint(self) -> None:
        self.control.request_checkpoint()
        self.notify("Checkpoint requested: saved at the next step boundary.")

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.HELP))


class MonitorApp(DashboardApp, inherit_bindings=False):
    """The dashboard of a run directory: read-only, `q` just closes it."""

    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help"),
    ]
    HELP = """\
[b]q[/b]   close the monitor (a live run goes on in its own terminal)
[b]?[/b]   this help (any key closes it)

Monitoring replays RUN_DIR/events.jsonl, then follows it while the run appends to it."""

    def __init__(self, feed: Feed, gpu_stats: Callable[[int], GpuStats | None] | None = None) -> None:
        super().__init__(feed, control=None, gpu_stats=gpu_stats)
