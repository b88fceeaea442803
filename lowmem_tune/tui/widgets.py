"""The dashboard's panels. Each one redraws itself from a `RunState` in `show(state)`; none of
them sees events or talks to the training thread."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.geometry import Size
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import RichLog, Sparkline, Static

from lowmem_tune import hardware
from lowmem_tune.events import (
    CheckpointSaved,
    EvalLoss,
    EvalResult,
    Event,
    Info,
    RunFinished,
    RunStarted,
    RunWarning,
)
from lowmem_tune.hardware import GiB, GpuStats
from lowmem_tune.train import format_results
from lowmem_tune.tui.chart import block_strip, format_value, render_line_chart
from lowmem_tune.tui.state import RunState

STATUS_STYLES = {"starting": "yellow", "running": "green", "stopping": "yellow", "completed": "bold green",
                 "stopped": "yellow", "failed": "bold red"}


def format_bytes(n: float | None) -> str:
    return "—" if n is None else hardware.format_bytes(n)


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_rate(rate: float | None) -> str:
    return "—" if rate is None else f"{rate:,.0f}"


def meter(fraction: float, width: int, style: str = "green", mark: float | None = None) -> Text:
    """A bar `width` cells wide, filled to `fraction`, with an optional marker (the plan) at `mark`."""
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    cells = Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))
    if mark is not None and 0 <= mark <= 1:
        at = min(int(mark * width), width - 1)
        cells = Text.assemble(cells[:at], ("┃", "bold yellow"), cells[at + 1:])
    return cells


def memory_meter(used: float, total: float, planned: float | None) -> Text:
    """Memory used of `total`, red when nearly full, with the plan's peak marked."""
    fraction = used / total
    return meter(fraction, 20, style="red" if fraction > 0.95 else "green", mark=planned / total if planned else None)


class Panel(Static):
    """A Static that redraws only when its text changed, and asks for a new layout only when its
    number of lines changed: re-laying out the whole screen on every refresh costs more than
    drawing it, and drawing is what the dashboard spends its CPU on."""

    _shown: Text | None = None

    def show_text(self, text: Text) -> None:
        if text == self._shown:
            return
        lines = len(text.plain.splitlines())
        self.update(text, layout=self._shown is None or lines != len(self._shown.plain.splitlines()))
        self._shown = text


class HeaderBar(Panel):
    def show(self, state: RunState, status: str) -> None:
        text = Text.assemble(("lowmem-tune", "bold"), "  ")
        started = state.started
        if started is not None:
            device = started.device + (f" ({started.gpu_name})" if started.gpu_name else "")
            device += f" · {started.dtype}" if started.dtype else ""
            text.append(f"{started.model} · {started.strategy} · {device} · {started.run_dir}  ")
        text.append(f" {status} ", style=f"reverse {STATUS_STYLES.get(status, '')}")
        self.show_text(text)


class LossChart(Widget):
    """Train loss as a line, eval loss as dots; sized to the widget. Drawn line by line from
    strips built once per `redraw()` (or resize), the cheapest way through Textual."""

    def __init__(self, state: RunState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state
        self._strips: list[Strip] = []
        self._strips_size: Size | None = None

    def redraw(self) -> None:
        """The state has new points: rebuild the strips and repaint."""
        self._strips_size = None
        self.refresh()

    def lines(self) -> list[Strip]:
        if self._strips_size != self.size:
            rows = render_line_chart(self.state.train_loss.points, self.state.eval_loss.points,
                                     self.size.width, self.size.height)
            self._strips = [Strip([Segment(text, Style.parse(style) if style else None) for text, style in row])
                            for row in rows]
            self._strips_size = self.size
        return self._strips

    def render_line(self, y: int) -> Strip:
        lines = self.lines()
        return lines[y] if y < len(lines) else Strip.blank(self.size.width)


class LossPanel(Vertical):
    def __init__(self, state: RunState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state

    def compose(self) -> ComposeResult:
        yield LossChart(self.state, id="loss-chart")
        yield Panel(id="loss-summary")

    def show(self, state: RunState) -> None:
        m = state.metrics
        parts = [("train ", "cyan"), (_value(state.train_loss.last), "bold")]
        if state.train_loss.minimum is not None:
            parts.append(f" (min {format_value(state.train_loss.minimum)})")
        if state.eval_loss.points:
            step, value = state.eval_loss.points[-1]
            parts += ["   ", ("eval ", "magenta"), (_value(value), "bold"), f" @ step {step:g}"]
        if m.get("lr") is not None:
            parts.append(f"   lr {m['lr']:.2e}")
        if m.get("grad_norm") is not None:
            parts.append(f"   grad norm {_value(m['grad_norm'])}")
        self.query_one("#loss-summary", Panel).show_text(Text.assemble(*parts))


def _value(value: float | None) -> str:
    return "—" if value is None else format_value(float(value))


class ProgressLine(Widget):
    """A bar and a percentage, sized to the widget. Textual's ProgressBar redraws on a timer of
    its own every second (15 times a second until it knows the total); this one only when the
    share it shows changes."""

    fraction: float | None = None

    def show(self, fraction: float | None) -> None:
        if fraction != self.fraction:
            self.fraction = fraction
            self.refresh()

    def render(self) -> Text:
        if self.fraction is None:
            return Text("")
        return Text.assemble(meter(self.fraction, max(self.size.width - 5, 1)), f"{self.fraction:5.0%}")


class ProgressPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Panel(id="progress-steps")
        yield ProgressLine(id="progress-bar")
        yield Panel(id="progress-times")

    def show(self, state: RunState) -> None:
        m = state.metrics
        total = m.get("total_steps") or (state.started.total_steps if state.started else None)
        step = m.get("step", state.started.start_step if state.started else 0)
        line = Text.assemble("step ", (f"{step}", "bold"), f" / {total or '—'}")
        if m.get("epoch") is not None:
            line.append(f"   epoch {m['epoch']:.2f}")
        self.query_one("#progress-steps", Panel).show_text(line)
        self.query_one(ProgressLine).show(min(step / total, 1.0) if total else None)
        eta = None if state.finished else m.get("eta_s")
        self.query_one("#progress-times", Panel).show_text(
            Text(f"elapsed {format_duration(m.get('elapsed_s'))}   ETA {format_duration(eta)}"))


class ThroughputPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Sparkline([], summary_function=lambda values: sum(values) / len(values), id="throughput-spark")
        yield Panel(id="throughput-text")

    def show(self, state: RunState) -> None:
        self.query_one(Sparkline).data = list(state.tokens_per_s)
        now = state.tokens_per_s[-1] if state.tokens_per_s else None
        self.query_one("#throughput-text", Panel).show_text(Text.assemble(
            (format_rate(now), "bold"), " tok/s now   ", (format_rate(state.mean_tokens_per_s), "bold"), " mean"))


class MemoryPanel(Panel):
    """GPU memory from NVML (what nvidia-smi shows), torch's allocated and peak, or the process
    RSS on CPU, against the plan's predicted peak."""

    def show(self, state: RunState, gpu: GpuStats | None) -> None:
        m, started = state.metrics, state.started
        planned = started.planned_peak_bytes if started else None
        lines: list[Text] = []
        if gpu is not None:
            used, total = gpu.used_bytes, gpu.total_bytes
            lines.append(Text.assemble("GPU   ", memory_meter(used, total, planned),
                                       f" {used / GiB:.1f} / {total / GiB:.1f} GiB"))
            extras = [f"{gpu.temperature_c} °C" if gpu.temperature_c is not None else None,
                      f"{gpu.utilization_percent} % util" if gpu.utilization_percent is not None else None,
                      f"{gpu.power_w:.0f} W" if gpu.power_w is not None else None]
            if any(extras):
                lines.append(Text("      " + " · ".join(e for e in extras if e), style="dim"))
        elif started is not None and started.gpu_total_bytes and m.get("cuda_peak") is not None:
            total = started.gpu_total_bytes
            lines.append(Text.assemble("GPU   ", memory_meter(m["cuda_peak"], total, planned),
                                       f" of {total / GiB:.1f} GiB (torch peak)"))
        if m.get("cuda_allocated") is not None:
            lines.append(Text(f"torch {format_bytes(m['cuda_allocated'])} allocated · peak {format_bytes(m.get('cuda_peak'))}"))
        if m.get("rss") is not None:
            lines.append(Text(f"RSS   {format_bytes(m['rss'])} (process, CPU)"))
        if planned:
            measured = m.get("cuda_peak") or m.get("rss")
            share = f" · measured {measured / planned:.0%} of it" if measured else ""
            lines.append(Text.assemble(("plan  ", "yellow"), f"{format_bytes(planned)} peak{share}"))
        self.show_text(Text("\n").join(lines) if lines else Text("waiting for the first step…", style="dim"))


class StrategyPanel(Panel):
    """The method's live state. Reads `RunStarted.strategy_info` (the strategy's describe()) and
    the strategy fields of each metrics line: `active_layers` (LISA, OwLore), `next_refresh_in` and
    `projectors_refreshed` (GaLore, Fira), describe()'s `layers` (one dict per decoder layer with its
    sampling `probability`), WeLore's `lrc` / `n_lrc` / reduction figures and the trainable share
    (WeLore, the adapters)."""

    def show(self, state: RunState) -> None:
        if state.started is None:
            self.show_text(Text("waiting for the run to start…", style="dim"))
            return
        info, m = state.started.strategy_info, state.metrics
        counts = ("trainable_parameters", "total_parameters")
        lines = [Text.assemble((str(info.get("name", state.started.strategy)), "bold"), "  ",
                               ("  ".join(f"{k} {_scalar(v)}" for k, v in info.items()
                                          if k != "name" and k not in counts and not isinstance(v, (list, dict))),
                                "dim"))]
        if info.get("trainable_parameters") and info.get("total_parameters"):
            trained, total = info["trainable_parameters"], info["total_parameters"]
            lines.append(Text.assemble("trains ", (f"{trained:,}", "bold"), f" of {total:,} parameters ({trained / total:.2%})"))
        if m.get("next_refresh_in") is not None:
            refreshed = m.get("projectors_refreshed") or 0
            lines.append(Text.assemble("next subspace refresh in ", (f"{m['next_refresh_in']}", "bold"), " steps",
                                       f"   ({refreshed} projectors refreshed last step)" if refreshed else ""))
        if "lrc" in info:
            lines.append(Text.assemble(
                ("LRC ", "bold"), f"{info['lrc']} low-rank matrices · N-LRC {info.get('n_lrc', '—')} · rank reduction ",
                (f"{info.get('rank_reduction_achieved', 0):.0%}", "bold"),
                f" · decoder parameters −{info.get('decoder_parameter_reduction', 0):.0%}"))
        num_layers = state.started.num_layers
        active = m.get("active_layers")
        if active is not None and num_layers:
            lit = set(active)
            strip = Text("layers ")
            for index in range(num_layers):
                strip.append("█" if index in lit else "░", style="bold green" if index in lit else "dim")
            strip.append(f"  active: {', '.join(str(i) for i in sorted(lit))}")
            lines.append(strip)
        probabilities = [layer["probability"] for layer in info.get("layers", []) if "probability" in layer]
        if probabilities:
            lines.append(Text.assemble("p      ", (block_strip(probabilities), "yellow"),
                                       f"  sampling probability (max {max(probabilities):.3f})"))
        self.show_text(Text("\n").join(lines))


def _scalar(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_line(event: Event) -> Text | None:
    """The event log's line for an event, or None for per-step metrics."""
    stamp = time.strftime("%H:%M:%S ", time.localtime(event.time))
    if isinstance(event, RunStarted):
        body = Text(f"started {event.model} with {event.strategy} on {event.device}, "
                    f"steps {event.start_step}→{event.total_steps}")
    elif isinstance(event, EvalLoss):
        body = Text.assemble(("eval loss ", "magenta"), f"{format_value(event.eval_loss)} at step {event.step}")
    elif isinstance(event, CheckpointSaved):
        body = Text(f"checkpoint step {event.step} saved in {event.seconds:.1f}s: {event.path}", style="green")
    elif isinstance(event, EvalResult):
        body = Text(f"{event.stage} eval: {format_results(event.results)}", style="bold")
    elif isinstance(event, RunWarning):
        body = Text(f"warning: {event.message}", style="yellow")
    elif isinstance(event, Info):
        body = Text(event.message, style="dim")
    elif isinstance(event, RunFinished):
        details = "".join(f": {part}" for part in (event.message, event.final_dir and f"model in {event.final_dir}") if part)
        body = Text(f"run {event.status} at step {event.step}{details}", style=STATUS_STYLES.get(event.status, ""))
    else:
        return None
    return Text.assemble((stamp, "dim"), body)


class EventLog(RichLog):
    """Events, plus whatever the run prints (captured by the app so it cannot tear the screen)."""

    def on_print(self, event: events.Print) -> None:
        text = event.text.split("\r")[-1].rstrip()
        if text:
            self.write(Text(text, style="dim"))
