"""The demo under OMP_NUM_THREADS=1 and 2, default basis rule: how far apart the two runs end.

Each run is `profiles/demo.yaml` (or --profile) in its own process; the two differ only in the
thread count, so any difference is the summation order of torch's kernels carried through
training. Reported: the largest difference of the logged train losses, of the eval losses, the
first step at which the train losses differ by more than 1e-6, 1e-4 and 1e-2 (where a difference
in the last bits starts and how fast it grows), and both held-out accuracies.

    python benchmarks/threads.py
    python benchmarks/threads.py --set strategy.name=full --output threads_full

Results: benchmarks/results/threads.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    """The CPU's model name: whether torch's own kernels depend on the thread count differs between
    hosts (MKL picks its kernels by CPU), so a result names the one it came from."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_demo(profile: Path, threads: int, overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "lowmem_tune", "run", str(profile), "--headless", "--set", f"output.dir={out}"]
    for override in overrides:
        cmd += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the run with {threads} threads failed:\n{done.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    final = json.loads((out / "eval.json").read_text())["final"]
    return {"threads": threads, "losses": [m["loss"] for m in metrics],
            "eval_losses": [e["eval_loss"] for e in events if e["type"] == "EvalLoss"],
            "accuracy": next(iter(final["tasks"].values()))["acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", default="threads", help="results file stem in benchmarks/results/")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        one, two = (run_demo(args.profile, n, args.overrides, Path(tmp) / f"threads{n}") for n in (1, 2))
    gaps = [abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)]
    first_over = {f"{bound:g}": next((i + 1 for i, g in enumerate(gaps) if g > bound), None)
                  for bound in (1e-6, 1e-4, 1e-2)}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(),
        "overrides": args.overrides,
        "max_train_loss_difference": max(gaps), "first_step_over": first_over, "train_loss_differences": gaps,
        "max_eval_loss_difference": max(abs(a - b) for a, b in zip(one["eval_losses"], two["eval_losses"], strict=True)),
        "accuracy": {"1 thread": one["accuracy"], "2 threads": two["accuracy"]},
        "final_eval_loss": {"1 thread": one["eval_losses"][-1], "2 threads": two["eval_losses"][-1]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(result, indent=2) + "\n")
    overrides = "".join(f" --set {o}" for o in args.overrides) + f" --output {args.output}" * (args.output != "threads")
    (RESULTS / f"{args.output}.md").write_text(
        f"The demo at OMP_NUM_THREADS=1 and 2 — {result['date']}, commit {result['commit']}, {result['machine']} "
        f"(`python benchmarks/threads.py{overrides}`)\n\n"
        "| | 1 thread | 2 threads |\n|---|---|---|\n"
        f"| held-out accuracy | {one['accuracy']:.3f} | {two['accuracy']:.3f} |\n"
        f"| final eval loss | {one['eval_losses'][-1]:.5f} | {two['eval_losses'][-1]:.5f} |\n\n"
        f"Largest difference over the run: train loss {result['max_train_loss_difference']:.2e} "
        f"({len(one['losses'])} steps), eval loss {result['max_eval_loss_difference']:.2e} "
        f"({len(one['eval_losses'])} evaluations). First step with a train-loss difference above "
        + ", ".join(f"{bound}: {step if step is not None else 'none'}" for bound, step in first_over.items()) + ".\n")
    print((RESULTS / f"{args.output}.md").read_text())


if __name__ == "__main__":
    main()
