"""Training: the loop, checkpoints, metrics and the console reporter.

Public API (the dashboard and the CLI use only this):
- `run_training(profile, resume, sink, control) -> RunOutcome`: the whole run; emits events
  (lowmem_tune.events) to `sink`, writes OUTPUT/metrics.jsonl and OUTPUT/events.jsonl, polls
  `control` between optimizer steps. Safe to call from a worker thread (no signal handlers
  installed off the main thread).
- `run_headless(profile, resume) -> exit code`: the run with a console reporter and SIGINT/SIGTERM
  handling.
"""

from lowmem_tune.errors import UserError
from lowmem_tune.train.control import RunControl


def run_headless(profile, resume: bool) -> int:
    raise UserError("`run` is not available yet in this build")


__all__ = ["RunControl", "run_headless"]
