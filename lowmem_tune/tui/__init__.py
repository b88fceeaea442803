"""Live terminal dashboard (Textual) for `lowmem-tune run`, and `lowmem-tune monitor RUN_DIR`.

Public API:
- `run_with_dashboard(profile, resume) -> exit code`: trains in a worker thread behind the dashboard.
- `monitor_command(run_dir)`: the same dashboard fed by RUN_DIR/events.jsonl.
- `DashboardApp(feed, control, ...)` / `MonitorApp(feed)`, with feeds `QueueFeed` (an EventSink)
  and `RunDirFeed`.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lowmem_tune.hardware import read_gpu_stats
from lowmem_tune.profile import Profile
from lowmem_tune.tui.app import DashboardApp, MonitorApp
from lowmem_tune.tui.feeds import QueueFeed, RunDirFeed
from lowmem_tune.tui.live import LiveRun
from lowmem_tune.tui.state import RunState


def run_with_dashboard(profile: Profile, resume: bool) -> int:
    run = LiveRun(profile, resume)
    app = DashboardApp(run.feed, control=run.control, gpu_stats=read_gpu_stats)
    run.start()
    try:
        app.run()
    finally:
        exit_code = run.finish()
    _print_summary(app.state)
    return exit_code


def monitor_command(run_dir: Path) -> None:
    app = MonitorApp(RunDirFeed.open(run_dir), gpu_stats=read_gpu_stats)
    app.run()


def _print_summary(state: RunState) -> None:
    """The dashboard's alternate screen is gone once it closes: leave the outcome in the terminal."""
    line = summary_line(state)
    if line is not None:
        Console(stderr=True).print(line, highlight=False)


def summary_line(state: RunState) -> str | None:
    """One line: how the run ended, its losses, each task's accuracy (baseline → final), where
    the model and the last checkpoint are."""
    finished = state.finished
    if finished is None:
        return None
    loss = state.train_loss.last
    parts = [f"run {finished.status} at step {finished.step}"]
    if loss is not None:
        parts.append(f"train loss {loss:.4f}")
    if state.eval_loss.last is not None:
        parts.append(f"eval loss {state.eval_loss.last:.4f}")
    stages = {stage: event.results.get("tasks", {}) for stage, event in state.eval_results.items()}
    for task in stages.get("final") or stages.get("baseline") or {}:
        accuracies = [f"{stages[stage][task]['acc']:.3f}" for stage in ("baseline", "final")
                      if task in stages.get(stage, {})]
        parts.append(f"{task} acc {' → '.join(accuracies)}")
    if finished.final_dir:
        parts.append(f"model saved to {finished.final_dir}")
    if state.last_checkpoint is not None:
        parts.append(f"last checkpoint {state.last_checkpoint.path}")
    return "lowmem-tune: " + " · ".join(parts)


__all__ = ["DashboardApp", "MonitorApp", "QueueFeed", "RunDirFeed", "monitor_command", "run_with_dashboard",
           "summary_line"]
