"""Throughput of a training run behind the live dashboard, as a ratio to the same run headless.

    OMP_NUM_THREADS=1 python benchmarks/dashboard_overhead.py [--profile profiles/demo.yaml] [--steps 100]

Runs the profile `--repeats` times each way, alternating (headless, dashboard, headless, ...), in one
process, each run in a fresh output directory with checkpoints, eval and the final save turned off.
Headless is `run_training` with no reporting at all (the strictest baseline); the dashboard run is
`run_training` in a worker thread behind `DashboardApp`, as `lowmem-tune run` does, drawing to the
terminal when there is one (run it in a terminal or tmux), else to Textual's headless driver.

Two throughputs over the steps after `--warmup`: tokens per wall second (what a user sees; on a
shared machine it moves with everyone else's load) and tokens per CPU second of this process, all
threads (the dashboard's own work counts against it; steady under outside load). Writes
benchmarks/results/dashboard_overhead.json. A measurement, not a test: it never fails on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
    """An event sink noting, per step, the tokens and the process CPU time (all threads)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float, float]] = []  # step, tokens, elapsed_s, cpu_s

    def emit(self, event) -> None:
        if isinstance(event, StepMetrics):
            m = event.metrics
            self.steps.append((m["step"], m["tokens"], m["elapsed_s"], time.process_time()))

    def throughput(self, warmup: int) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second) over the steps after `warmup`."""
        start = next(s for s in self.steps if s[0] == warmup)
        measured = [s for s in self.steps if s[0] > warmup]
        tokens = sum(s[1] for s in measured)
        return tokens / (measured[-1][2] - start[2]), tokens / (measured[-1][3] - start[3])


class ClosingDashboard(DashboardApp):
    """Closes itself when the run finishes."""

    def pull_events(self) -> None:
        super().pull_events()
        if self.state.finished is not None and self.is_running:
            self.exit()


def headless_run(profile: Profile, clock: StepClock) -> None:
    outcome = run_training(profile, resume=False, sink=clock, control=RunControl())
    assert outcome.status == "completed", outcome


def dashboard_run(profile: Profile, clock: StepClock, terminal: bool) -> None:
    """What `run_with_dashboard` does, with the clock listening too."""
    feed, control = QueueFeed(), RunControl()
    outcomes = []
    worker = threading.Thread(target=lambda: outcomes.append(
        run_training(profile, resume=False, sink=FanOut(feed, clock), control=control)))
    worker.start()
    try:
        ClosingDashboard(feed, control=control).run(headless=not terminal, size=None if terminal else (160, 48))
    finally:
        worker.join()
    assert outcomes and outcomes[0].status == "completed", outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="profiles/demo.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    terminal = sys.stderr.isatty()  # Textual draws on stderr

    runs: dict[str, dict[str, list[float]]] = {mode: {"wall": [], "cpu": []} for mode in ("headless", "dashboard")}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in ("headless", "dashboard"):
                profile = load_profile(args.profile, [
                    f"output.dir={Path(tmp) / f'{mode}-{repeat}'}", f"train.max_steps={args.steps}",
                    "train.save_every=1000000", "train.eval_every=1000000", "output.save_final=false",
                    "eval.tasks=[]", "eval.baseline=false",
                ])
                clock = StepClock()
                if mode == "headless":
                    headless_run(profile, clock)
                else:
                    dashboard_run(profile, clock, terminal)
                wall, cpu = clock.throughput(args.warmup)
                runs[mode]["wall"].append(round(wall, 1))
                runs[mode]["cpu"].append(round(cpu, 1))
                print(f"{mode:9s} run {repeat}: {wall:8.1f} tokens/s wall, {cpu:8.1f} tokens/CPU-s", flush=True)

    ratios = {kind: round(statistics.median(runs["dashboard"][kind]) / statistics.median(runs["headless"][kind]), 4)
              for kind in ("wall", "cpu")}
    result = {
        "profile": args.profile, "steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
        "dashboard_driver": "terminal" if terminal else "textual headless driver (renders, writes no output)",
        "tokens_per_s": runs, "ratio_dashboard_to_headless": ratios,
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"dashboard / headless throughput (medians): wall {ratios['wall']:.3f}, per CPU second {ratios['cpu']:.3f} "
          f"(target >= 0.95) -> {RESULTS}")


if __name__ == "__main__":
    main()
