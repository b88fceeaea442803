"""The run directory other tools read: metrics.jsonl, events.jsonl, profile.yaml, eval.json."""

from __future__ import annotations

import json
from pathlib import Path

from lowmem_tune.atomic import write_text_atomic
from lowmem_tune.events import Event, StepMetrics, event_to_json


class RunFilesSink:
    """Appends every event to events.jsonl and each step's metrics to metrics.jsonl.

    Lines are flushed as written so `monitor` can follow a live run. On resume, lines of steps
    after the checkpoint (and the earlier session's end) are dropped first, so the files describe
    one consistent trajectory.
    """

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.events_path = run_dir / "events.jsonl"
        if resume_step is None:
            for path in (self.metrics_path, self.events_path):
                path.unlink(missing_ok=True)
        else:
            _truncate_after(self.metrics_path, resume_step, lambda d: d.get("step"))
            _truncate_after(self.events_path, resume_step, _event_step)
        self._metrics = open(self.metrics_path, "a", buffering=1)
        self._events = open(self.events_path, "a", buffering=1)

    def emit(self, event: Event) -> None:
        self._events.write(event_to_json(event) + "\n")
        if isinstance(event, StepMetrics):
            self._metrics.write(json.dumps(event.metrics) + "\n")

    def close(self) -> None:
        self._metrics.close()
        self._events.close()


def _event_step(data: dict) -> float | None:
    """The step an events.jsonl line belongs to; the end of the earlier session (its RunFinished)
    belongs to no step the resumed run keeps."""
    if data.get("type") == "RunFinished":
        return float("inf")
    if data.get("type") == "StepMetrics":
        return data["metrics"].get("step")
    return data.get("step")  # EvalLoss, CheckpointSaved carry theirs; the others none


def _truncate_after(path: Path, step: int, step_of) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            value = step_of(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a crash
        if value is None or value <= step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))
