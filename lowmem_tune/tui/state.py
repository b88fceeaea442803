"""What the dashboard knows about a run, folded from its event stream.

The app applies each batch of events here and then redraws; widgets read this state and never
see events. A live run and a replayed run directory therefore look the same.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lowmem_tune.events import (
    CheckpointSaved,
    EvalLoss,
    EvalResult,
    Event,
    RunFinished,
    RunStarted,
    StepMetrics,
)

THROUGHPUT_WINDOW = 240
"""Steps of tokens/s history the sparkline shows."""


def _mean_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


class Series:
    """(step, value) points kept to at most `max_points`: when full, neighbouring pairs merge
    into their mean, so a run of any length costs the same to hold and to draw."""

    def __init__(self, max_points: int = 2048) -> None:
        self.max_points = max_points
        self.points: list[tuple[float, float]] = []

    def add(self, step: float, value: float) -> None:
        self.points.append((step, value))
        if len(self.points) > self.max_points:
            pairs = zip(self.points[0::2], self.points[1::2])
            merged = [((a[0] + b[0]) / 2, _mean_finite([a[1], b[1]])) for a, b in pairs]
            if len(self.points) % 2:
                merged.append(self.points[-1])
            self.points = merged

    def drop_after(self, step: float) -> None:
        """Forget points past `step` (a resumed run repeats the steps after its checkpoint)."""
        self.points = [p for p in self.points if p[0] <= step]

    @property
    def last(self) -> float | None:
        return self.points[-1][1] if self.points else None

    @property
    def minimum(self) -> float | None:
        finite = [v for _, v in self.points if math.isfinite(v)]
        return min(finite) if finite else None


@dataclass
class RunState:
    started: RunStarted | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """The latest metrics.jsonl line."""
    train_loss: Series = field(default_factory=Series)
    eval_loss: Series = field(default_factory=Series)
    tokens_per_s: deque[float] = field(default_factory=lambda: deque(maxlen=THROUGHPUT_WINDOW))
    tokens_per_s_sum: float = 0.0
    tokens_per_s_count: int = 0
    last_checkpoint: CheckpointSaved | None = None
    eval_results: dict[str, EvalResult] = field(default_factory=dict)
    """By stage: "baseline", "final"."""
    finished: RunFinished | None = None

    def apply(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.started = event
            self.finished = None
            self.train_loss.drop_after(event.start_step)
            self.eval_loss.drop_after(event.start_step)
        elif isinstance(event, StepMetrics):
            self._apply_step(event.metrics)
        elif isinstance(event, EvalLoss):
            self.eval_loss.add(event.step, event.eval_loss)
        elif isinstance(event, CheckpointSaved):
            self.last_checkpoint = event
        elif isinstance(event, EvalResult):
            self.eval_results[event.stage] = event
        elif isinstance(event, RunFinished):
            self.finished = event

    def _apply_step(self, metrics: dict[str, Any]) -> None:
        self.metrics = metrics
        step = metrics.get("step")
        if step is None:
            return
        if metrics.get("loss") is not None:
            self.train_loss.add(step, float(metrics["loss"]))
        rate = metrics.get("tokens_per_s")
        if rate is not None:
            self.tokens_per_s.append(float(rate))
            self.tokens_per_s_sum += float(rate)
            self.tokens_per_s_count += 1

    @property
    def mean_tokens_per_s(self) -> float | None:
        return self.tokens_per_s_sum / self.tokens_per_s_count if self.tokens_per_s_count else None

    @property
    def status(self) -> str:
        if self.finished is not None:
            return self.finished.status
        return "running" if self.started is not None else "starting"
