"""Headless reporting: a rich progress bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, TextIO

from lowmem_tune.events import (
    CheckpointSaved,
    EvalLoss,
    EvalResult,
    Event,
    Info,
    RunFinished,
    RunStarted,
    RunWarning,
    StepMetrics,
)
from lowmem_tune.profile import Profile
from lowmem_tune.train.control import RunControl

SAME_SIGNAL_S = 1.0
"""A second stop signal sooner than this after the first is the same request, not an abort."""


def format_results(results: dict[str, Any]) -> str:
    parts = []
    for task, metrics in results.get("tasks", {}).items():
        text = f"{task} acc={metrics['acc']:.3f}"
        if "acc_stderr" in metrics:
            text += f"±{metrics['acc_stderr']:.3f}"
        if "acc_norm" in metrics:
            text += f" acc_norm={metrics['acc_norm']:.3f}"
        parts.append(f"{text} (n={metrics['n']})")
    return "; ".join(parts)


def _step_line(m: dict[str, Any]) -> str:
    line = (f"step {m['step']}/{m['total_steps']}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
            f"grad_norm {m['grad_norm']:.3f}  {m['tokens_per_s']:.0f} tok/s  eta {m['eta_s']:.0f}s")
    if "active_layers" in m:
        line += f"  layers {m['active_layers']}"
    return line


class PlainReporter:
    """One line every `log_every` steps and for every notable event (logs, CI, pipes)."""

    def __init__(self, log_every: int, out: TextIO | None = None) -> None:
        self.log_every = log_every
        self.out = out or sys.stdout

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def emit(self, event: Event) -> None:
        match event:
            case RunStarted():
                precision = f" in {event.dtype}" if event.dtype else ""
                self._print(f"run {event.run_dir}: {event.model}, strategy {event.strategy} on {event.device}"
                            f"{precision}, steps {event.start_step}->{event.total_steps}")
            case StepMetrics(metrics=m):
                if m["step"] % self.log_every == 0 or m["step"] == m["total_steps"]:
                    self._print(_step_line(m))
            case EvalLoss():
                self._print(f"step {event.step}  eval_loss {event.eval_loss:.4f}")
            case CheckpointSaved():
                self._print(f"checkpoint saved: {event.path} ({event.seconds:.1f}s)")
            case EvalResult():
                self._print(f"{event.stage} eval: {format_results(event.results)}")
            case RunWarning():
                self._print(f"warning: {event.message}")
            case Info():
                self._print(event.message)
            case RunFinished():
                tail = f": {event.message}" if event.message else ""
                self._print(f"run {event.status} at step {event.step}{tail}")


class ProgressReporter(PlainReporter):
    """A rich progress bar with loss, tokens/s and ETA; other events print above it."""

    def __init__(self, log_every: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        super().__init__(log_every)
        self.console = Console()
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, transient=False,
        )
        self.task = None

    def _print(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def emit(self, event: Event) -> None:
        match event:
            case RunStarted():
                super().emit(event)
                self.progress.start()
                self.task = self.progress.add_task("train", total=event.total_steps, completed=event.start_step,
                                                   status="")
            case StepMetrics(metrics=m) if self.task is not None:
                status = f"loss {m['loss']:.4f}  {m['tokens_per_s']:.0f} tok/s"
                self.progress.update(self.task, completed=m["step"], status=status)
            case RunFinished():
                self.progress.stop()
                super().emit(event)
            case _:
                super().emit(event)


def run_headless(profile: Profile, resume: bool) -> int:
    """`run --headless`: train with console reporting; Ctrl-C / SIGTERM checkpoint and stop."""
    from lowmem_tune.train.run import run_training

    reporter = ProgressReporter(profile.train.log_every) if sys.stdout.isatty() else PlainReporter(profile.train.log_every)
    control = RunControl()
    with graceful_signals(control, reporter):
        outcome = run_training(profile, resume, reporter, control)
    return outcome.exit_code


class graceful_signals:
    """First SIGINT / SIGTERM: checkpoint at the next step boundary and stop. Second: abort at once
    (checkpoints are written atomically, so nothing already saved is damaged)."""

    def __init__(self, control: RunControl, reporter: PlainReporter) -> None:
        self.control = control
        self.reporter = reporter
        self.previous: dict[int, Any] = {}
        self.first = 0.0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.control.stop_requested:
            if time.monotonic() - self.first < SAME_SIGNAL_S:
                return  # Ctrl-C reaches torchrun's workers twice: from the terminal, and from torchrun
            raise KeyboardInterrupt
        self.first = time.monotonic()
        self.control.request_stop()
        self.reporter.emit(Info("stopping: saving a checkpoint at the end of this step (again to abort)"))

    def __enter__(self) -> "graceful_signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
