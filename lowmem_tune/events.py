"""The event stream a training run emits.

Training publishes these to an `EventSink`; the console reporter, the Textual dashboard and
`OUTPUT/events.jsonl` (which `monitor` tails) consume them. Every event is a small dataclass that
round-trips through JSON, so a live run and a replayed run directory look the same to consumers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class RunStarted:
    run_dir: str
    model: str
    strategy: str
    device: str
    gpu_name: str | None
    total_steps: int
    start_step: int
    num_layers: int
    planned_peak_bytes: int | None = None
    gpu_total_bytes: int | None = None
    gpu_nvml_index: int | None = None
    """NVML's index of the GPU in use (NVML ignores CUDA_VISIBLE_DEVICES); None when NVML does not know it."""
    strategy_info: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    """The precision the weights train in (bfloat16, float32, ...); None in runs from before it was recorded."""
    time: float = field(default_factory=time.time)


@dataclass
class StepMetrics:
    """One optimizer step. `metrics` is exactly the line written to metrics.jsonl."""

    metrics: dict[str, Any]
    time: float = field(default_factory=time.time)


@dataclass
class EvalLoss:
    step: int
    eval_loss: float
    time: float = field(default_factory=time.time)


@dataclass
class CheckpointSaved:
    step: int
    path: str
    seconds: float
    time: float = field(default_factory=time.time)


@dataclass
class EvalResult:
    stage: str  # "baseline" or "final"
    results: dict[str, Any]
    time: float = field(default_factory=time.time)


@dataclass
class RunWarning:
    message: str
    time: float = field(default_factory=time.time)


@dataclass
class Info:
    message: str
    time: float = field(default_factory=time.time)


@dataclass
class RunFinished:
    status: str  # "completed", "stopped", "failed"
    step: int
    message: str = ""
    final_dir: str | None = None
    time: float = field(default_factory=time.time)


Event = RunStarted | StepMetrics | EvalLoss | CheckpointSaved | EvalResult | RunWarning | Info | RunFinished

EVENT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (RunStarted, StepMetrics, EvalLoss, CheckpointSaved, EvalResult, RunWarning, Info, RunFinished)
}


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


def event_to_json(event: Event) -> str:
    return json.dumps({"type": type(event).__name__, **dataclasses.asdict(event)})


def event_from_json(line: str) -> Event:
    data = json.loads(line)
    cls = EVENT_TYPES[data.pop("type")]
    return cls(**data)


class FanOut:
    """Sends each event to several sinks."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)
