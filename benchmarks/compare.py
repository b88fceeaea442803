"""Variants of a profile, several seeds each, on the demo task or a harder synthetic one: held-out
loss and accuracy, mean and spread over the seeds, in one invocation.

Tasks:
- demo: `profiles/demo.yaml` (synthetic-boolq; held-out accuracy on 200 examples, held-out loss).
- markov: the demo's model and optimizer on text from a fixed first-order Markov chain (64 states,
  4 likely successors each; the chain used for the moments policy in optimizer_step.py), packed to
  64-token sequences; held-out loss only (the best reachable is the chain's entropy, log 4 a
  token, plus the tokenizer's own boundaries).

    python benchmarks/compare.py --name rounding_bf16 --task demo --seeds 0 1 2 --steps 150 \\
        --common model.dtype=bfloat16 train.lr=1e-4 \\
        --variant "stochastic: strategy.rounding=stochastic" --variant "nearest: strategy.rounding=nearest"

A variant is "LABEL: KEY=VALUE KEY=VALUE ..." (profile overrides); --common applies to all.
Results: benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not


def write_markov_text(path: Path, lines: int = 3000, words: int = 40, seed: int = 1234) -> None:
    """Lines of 'sN' words from a fixed random chain: 64 states, 4 equally likely successors each."""
    rng = random.Random(seed)
    successors = [[rng.randrange(64) for _ in range(4)] for _ in range(64)]
    with path.open("w") as f:
        for _ in range(lines):
            state = rng.randrange(64)
            out = []
            for _ in range(words):
                out.append(f"s{state}")
                state = rng.choice(successors[state])
            f.write(" ".join(out) + "\n")


class _Events:
    def __init__(self) -> None:
        self.eval_losses: list[float] = []

    def emit(self, event: Any) -> None:
        if type(event).__name__ == "EvalLoss":
            self.eval_losses.append(event.eval_loss)


def run_variant(task: str, overrides: list[str], seed: int, steps: int | None, work: Path) -> dict[str, Any]:
    from lowmem_tune.profile import load_profile
    from lowmem_tune.train import RunControl, run_training

    sets = [f"train.seed={seed}", f"output.dir={work}", "eval.baseline=false", "train.save_every=100000"]
    if task == "markov":
        text = work.parent / "markov.txt"
        if not text.exists():
            write_markov_text(text)
        sets += [f"data.dataset={text}", "data.format=text", "data.packing=true", "eval.tasks=[]"]
    if steps is not None:
        sets.append(f"train.max_steps={steps}")
    profile = load_profile(ROOT / "profiles" / "demo.yaml", sets + overrides)
    events = _Events()
    began = time.perf_counter()
    outcome = run_training(profile, False, events, RunControl())
    if outcome.status != "completed":
        raise RuntimeError(f"{overrides} seed {seed}: run {outcome.status} at step {outcome.step}")
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((work / "eval.json").read_text()) if (work / "eval.json").exists() else {}
    final = (result.get("final") or {}).get("tasks", {})
    return {"seed": seed, "heldout_loss": events.eval_losses[-1] if events.eval_losses else None,
            "accuracy": next(iter(final.values()), {}).get("acc"),
            "train_loss": statistics.mean(m["loss"] for m in metrics[-10:]),
            "wall_s": round(time.perf_counter() - began, 1)}


def _spread(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.mean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="results file stem in benchmarks/results/")
    parser.add_argument("--task", choices=["demo", "markov"], default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--common", nargs="*", default=[], help="overrides for every variant")
    parser.add_argument("--variant", action="append", required=True, help='"LABEL: KEY=VALUE ..."')
    args = parser.parse_args()

    variants = []
    for spec in args.variant:
        label, _, sets = spec.partition(":")
        variants.append((label.strip(), args.common + sets.split()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in variants:
            runs = []
            for seed in args.seeds:
                runs.append(run_variant(args.task, overrides, seed, args.steps, Path(tmp) / f"run{len(rows)}-{seed}"))
                print(json.dumps({"variant": label, **runs[-1]}), flush=True)
            row = {"variant": label, "overrides": overrides, "runs": runs}
            for key in ("heldout_loss", "accuracy", "train_loss"):
                row[key], row[f"{key}_sd"] = _spread([r[key] for r in runs])
            rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "task": args.task, "seeds": args.seeds,
            "steps": args.steps, "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, CPU",
            "command": " ".join(["python", "benchmarks/compare.py", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    def cell(row: dict, key: str, fmt: str) -> str:
        return "n/a" if row[key] is None else f"{row[key]:{fmt}} ± {row[key + '_sd']:{fmt}}"

    lines = [f"{args.task} task, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), mean ± sd — "
             f"{meta['date']}, commit {meta['commit']}, {meta['machine']} (`{meta['command']}`)", "",
             "| variant | held-out loss | held-out accuracy | train loss (last 10) |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {cell(r, 'heldout_loss', '.4f')} | {cell(r, 'accuracy', '.3f')} | "
              f"{cell(r, 'train_loss', '.4f')} |" for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
