"""Training: the loop, checkpoints, metrics and the console reporter.

Public API (the dashboard and the CLI use only this):
- `run_training(profile, resume, sink, control) -> RunOutcome`: the whole run (a `TrainingRun`:
  setup, train, cleanup); emits events
  (lowmem_tune.events) to `sink`, writes OUTPUT/metrics.jsonl and OUTPUT/events.jsonl, polls
  `control` between optimizer steps. Safe to call from a worker thread (it installs no signal
  handlers).
- `run_headless(profile, resume) -> exit code`: the run with a console reporter and SIGINT/SIGTERM
  handling.
"""

from typing import Any

from lowmem_tune.train.console import format_results, run_headless
from lowmem_tune.train.control import RunControl

__all__ = ["RunControl", "RunOutcome", "TrainingRun", "format_results", "run_headless", "run_training"]


def __getattr__(name: str) -> Any:
    # The loop pulls in torch and transformers (seconds); `monitor` only needs the light parts.
    if name in ("run_training", "RunOutcome", "TrainingRun"):
        from lowmem_tune.train import run

        return getattr(run, name)
    raise AttributeError(f"module 'lowmem_tune.train' has no attribute {name!r}")
