"""Throughput of a training run behind the live dashboard, as a ratio to the same run headless.

    OMP_NUM_THREADS=1 python benchmarks/dashboard_overhead.py [--profile profiles/demo.yaml] [--steps 100] [--pairs 8]

Run it in a terminal (or tmux) without redirecting stderr: Textual draws on stderr, and without a
terminal the dashboard falls back to Textual's headless driver, which renders but writes nothing.

Runs the profile `--pairs` times each way, alternating (headless, dashboard, headless, ...), in
one process, each run in a fresh output directory with checkpoints, eval and the final save off.
Headless is `run_training` with no reporting at all (the strictest baseline); the dashboard run is
`run_training` in a worker thread behind `DashboardApp`, as `lowmem-tune run` does.

Throughput is tokens per wall second over the steps after `--warmup`. A shared machine moves it
by +-10% from one run to the next, more than the dashboard costs, so each dashboard run is
compared with the headless run just before it and the result is the median of those paired
ratios, with their quartiles; the same figures for each headless run against the one before it
show how much of that spread is the machine's. Beside it, what the dashboard itself spent: the UI thread's CPU time
over wall time while training ran (the redraws' share of the interpreter, which a small model's
Python-bound step waits for). Writes benchmarks/results/dashboard_overhead.json. A measurement,
not a test: it never fails on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lowmem_tune.events import FanOut, StepMetrics
from lowmem_tune.profile import Profile, load_profile
from lowmem_tune.train import RunControl, run_training
from lowmem_tune.tui import DashboardApp, QueueFeed

RESULTS = Path(__file__).parent / "results" / "dashboard_overhead.json"


class StepClock:
    """An event sink noting, per step, the tokens and the wall time."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float]] = []  # step, tokens, monotonic time

    def emit(self, event) -> None:
        if isinstance(event, StepMetrics):
            self.steps.append((event.metrics["step"], event.metrics["tokens"], time.monotonic()))

    def window(self, warmup: int) -> tuple[float, float]:
        """The (start, end) monotonic times of the steps after `warmup`."""
        return next(s[2] for s in self.steps if s[0] == warmup), self.steps[-1][2]

    def throughput(self, warmup: int) -> float:
        """Tokens per wall second over the steps after `warmup`."""
        start, end = self.window(warmup)
        return sum(s[1] for s in self.steps if s[0] > warmup) / (end - start)


class ClosingDashboard(DashboardApp):
    """Closes itself when the run finishes; notes (wall, UI thread CPU) at every tick."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ticks: list[tuple[float, float]] = []

    def tick(self) -> None:
        super().tick()
        self.ticks.append((time.monotonic(), time.thread_time()))

    def pull_events(self) -> None:
        super().pull_events()
        if self.state.finished is not None and self.is_running:
            self.exit()

    def ui_share(self, start: float, end: float) -> float:
        """UI thread CPU seconds per wall second between the first and last tick in [start, end]."""
        inside = [t for t in self.ticks if start <= t[0] <= end]
        (wall0, cpu0), (wall1, cpu1) = inside[0], inside[-1]
        return (cpu1 - cpu0) / (wall1 - wall0)


def headless_run(profile: Profile, clock: StepClock) -> None:
    outcome = run_training(profile, resume=False, sink=clock, control=RunControl())
    assert outcome.status == "completed", outcome


def dashboard_run(profile: Profile, clock: StepClock, terminal: bool) -> ClosingDashboard:
    """What `run_with_dashboard` does, with the clock listening too."""
    feed, control = QueueFeed(), RunControl()
    outcomes = []
    worker = threading.Thread(target=lambda: outcomes.append(
        run_training(profile, resume=False, sink=FanOut(feed, clock), control=control)))
    app = ClosingDashboard(feed, control=control)
    worker.start()
    try:
        app.run(headless=not terminal, size=None if terminal else (160, 48))
    finally:
        worker.join()
    assert outcomes and outcomes[0].status == "completed", outcomes
    return app


def summary(values: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {"median": round(median, 4), "q1": round(q1, 4), "q3": round(q3, 4),
            "min": round(min(values), 4), "max": round(max(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="profiles/demo.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=24)
    args = parser.parse_args()
    terminal = sys.stderr.isatty()  # Textual draws on stderr

    pairs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            measured: dict[str, float] = {}
            for mode in ("headless", "dashboard"):
                profile = load_profile(args.profile, [
                    f"output.dir={Path(tmp) / f'{mode}-{pair}'}", f"train.max_steps={args.steps}",
                    "train.save_every=1000000", "train.eval_every=1000000", "output.save_final=false",
                    "eval.tasks=[]", "eval.baseline=false",
                ])
                clock = StepClock()
                if mode == "headless":
                    headless_run(profile, clock)
                else:
                    app = dashboard_run(profile, clock, terminal)
                    measured["ui_share"] = round(app.ui_share(*clock.window(args.warmup)), 4)
                measured[mode] = round(clock.throughput(args.warmup), 1)
            measured["ratio"] = round(measured["dashboard"] / measured["headless"], 4)
            pairs.append(measured)
            print(f"pair {pair}: headless {measured['headless']:8.1f}, dashboard {measured['dashboard']:8.1f} "
                  f"tokens/s -> {measured['ratio']:.3f}; UI thread {measured['ui_share']:.1%} of a core", flush=True)

    ratios = [p["ratio"] for p in pairs]
    headless_to_headless = [b["headless"] / a["headless"] for a, b in zip(pairs, pairs[1:])]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "profile": args.profile, "steps": args.steps, "warmup_steps": args.warmup, "pairs": pairs,
        "dashboard_driver": "terminal" if terminal else "textual headless driver (renders, writes no output)",
        "terminal_size": list(os.get_terminal_size(sys.stderr.fileno())) if terminal else None,
        "ratio_dashboard_to_headless": summary(ratios),
        "ratio_headless_to_previous_headless": summary(headless_to_headless),
        "ui_thread_share_median": round(statistics.median(p["ui_share"] for p in pairs), 4),
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    dashboard, noise = result["ratio_dashboard_to_headless"], result["ratio_headless_to_previous_headless"]
    print(f"dashboard / headless throughput, median of {len(pairs)} paired runs: {dashboard['median']:.3f} "
          f"(quartiles {dashboard['q1']:.3f}-{dashboard['q3']:.3f}; target >= 0.95); headless / headless "
          f"{noise['median']:.3f} ({noise['q1']:.3f}-{noise['q3']:.3f}); UI thread "
          f"{result['ui_thread_share_median']:.1%} of a core -> {RESULTS}")


if __name__ == "__main__":
    main()
