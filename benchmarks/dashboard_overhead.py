"""Throughput of a training run behind the live dashboard, as a ratio to the same run headless.

    OMP_NUM_THREADS=1 python benchmarks/dashboard_overhead.py [--profile profiles/demo.yaml] [--steps 150]

Runs the profile `--repeats` times each way, alternating (headless, dashboard, headless, ...), in one
process, each run in a fresh output directory with checkpoints, eval and the final save turned off.
Headless is `run_training` with an event sink that drops everything (the strictest baseline); the
dashboard run is `run_training` in its worker thread behind `DashboardApp`, exactly as `lowmem-tune
run` does, drawing to this terminal when stdout is one (run it in a terminal or tmux), else to
Textual's headless driver. Throughput = tokens / seconds over the steps after `--warmup`, read from
each run's metrics.jsonl. Writes benchmarks/results/dashboard_overhead.json and, with
--screenshot, an SVG of the dashboard's last frame. A measurement, not a test: it never fails on
timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lowmem_tune.events import FanOut
from lowmem_tune.profile import Profile, load_profile
from lowmem_tune.train import RunControl, run_training
from lowmem_tune.tui import DashboardApp
from lowmem_tune.tui.live import LiveRun

RESULTS = Path(__file__).parent / "results" / "dashboard_overhead.json"


class ClosingDashboard(DashboardApp):
    """Closes when the run finishes, first saving its last frame as an SVG if asked to."""

    def __init__(self, run: LiveRun, screenshot: Path | None) -> None:
        super().__init__(run.feed, control=run.control)
        self.screenshot = screenshot

    def pull_events(self) -> None:
        super().pull_events()
        if self.state.finished is not None and self.is_running:
            if self.screenshot is not None:
                self.save_screenshot(self.screenshot.name, str(self.screenshot.parent))
            self.exit()


def throughput(run_dir: Path, warmup: int) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    measured = [m for m in lines if m["step"] > warmup]
    first = next(m for m in lines if m["step"] == warmup)
    return sum(m["tokens"] for m in measured) / (measured[-1]["elapsed_s"] - first["elapsed_s"])


def headless_run(profile: Profile) -> None:
    outcome = run_training(profile, resume=False, sink=FanOut(), control=RunControl())
    assert outcome.status == "completed", outcome


def dashboard_run(profile: Profile, screenshot: Path | None, terminal: bool) -> None:
    run = LiveRun(profile, resume=False)
    app = ClosingDashboard(run, screenshot)
    run.start()
    try:
        app.run(headless=not terminal, size=None if terminal else (160, 48))
    finally:
        run.finish()
    assert app.state.finished is not None and app.state.finished.status == "completed", app.state.finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="profiles/demo.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--screenshot", type=Path, default=None, help="SVG of the dashboard's last frame")
    args = parser.parse_args()
    terminal = sys.stdout.isatty()

    runs: dict[str, list[float]] = {"headless": [], "dashboard": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in ("headless", "dashboard"):
                run_dir = Path(tmp) / f"{mode}-{repeat}"
                profile = load_profile(args.profile, [
                    f"output.dir={run_dir}", f"train.max_steps={args.steps}", "train.save_every=1000000",
                    "train.eval_every=1000000", "output.save_final=false", "eval.tasks=[]", "eval.baseline=false",
                ])
                began = time.perf_counter()
                if mode == "headless":
                    headless_run(profile)
                else:
                    last = repeat == args.repeats - 1
                    dashboard_run(profile, args.screenshot if last else None, terminal)
                rate = throughput(run_dir, args.warmup)
                runs[mode].append(rate)
                print(f"{mode:9s} run {repeat}: {rate:8.1f} tokens/s ({time.perf_counter() - began:.0f}s)", flush=True)

    ratio = statistics.median(runs["dashboard"]) / statistics.median(runs["headless"])
    result = {
        "profile": args.profile, "steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
        "dashboard_driver": "terminal" if terminal else "textual headless driver (renders, writes no output)",
        "tokens_per_s": runs, "ratio_dashboard_to_headless": round(ratio, 4),
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"dashboard / headless throughput: {ratio:.3f} (target >= 0.95) -> {RESULTS}")


if __name__ == "__main__":
    main()
