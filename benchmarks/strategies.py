"""Every strategy on the demo task: accuracy, loss, tokens/s and memory, as ratios to full AdamW.

Each strategy runs `profiles/demo.yaml` (or --profile) in its own process, one after the other in
this one invocation, so peak RSS is per strategy and all ratios share the machine's state. Tokens/s
is the median over the steps after --warmup. Results: benchmarks/results/strategies.{json,md}.

    python benchmarks/strategies.py                 # all strategies, the demo's 300 steps
    python benchmarks/strategies.py --steps 100 --strategies full galore
    python benchmarks/strategies.py --strategies full galore:strategy.moments=project galore:strategy.moments=reset

An entry NAME:KEY=VALUE[,KEY=VALUE] runs strategy NAME with those profile overrides.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not
from lowmem_tune.profile import STRATEGY_NAMES  # noqa: E402


def run_one(profile: Path, entry: str, steps: int | None, out: Path) -> dict:
    strategy, _, overrides = entry.partition(":")
    cmd = [sys.executable, "-m", "lowmem_tune", "run", str(profile), "--headless",
           "--set", f"strategy.name={strategy}", "--set", f"output.dir={out}", "--set", "eval.baseline=false"]
    for override in filter(None, overrides.split(",")):
        cmd += ["--set", override]
    if steps is not None:
        cmd += ["--set", f"train.max_steps={steps}"]
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{strategy} failed:\n{done.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    eval_losses = [e["eval_loss"] for e in events if e["type"] == "EvalLoss"]
    return {"strategy": entry, "wall_s": wall, "metrics": metrics, "eval_loss": eval_losses[-1] if eval_losses else None,
            "eval": json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else None}


def summarize(run: dict, warmup: int) -> dict:
    m = run["metrics"]
    steady = [x["tokens_per_s"] for x in m[warmup:]] or [x["tokens_per_s"] for x in m]
    final = (run["eval"] or {}).get("final") or {}
    acc = next(iter(final.get("tasks", {}).values()), {}).get("acc")
    return {
        "strategy": run["strategy"], "steps": len(m), "wall_s": round(run["wall_s"], 1),
        "tokens_per_s": statistics.median(steady), "final_loss": statistics.mean(x["loss"] for x in m[-10:]),
        "eval_loss": run["eval_loss"],
        "peak_rss": max(x.get("rss", 0) for x in m), "accuracy": acc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "demo.yaml")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_NAMES))
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--output", default="strategies", help="results file stem in benchmarks/results/")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            out = Path(tmp) / f"run{len(rows)}"
            rows.append(summarize(run_one(args.profile, strategy, args.steps, out), args.warmup))
            print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["strategy"] == "full"), rows[0])  # ratios to full AdamW
    for r in rows:
        r["tokens_per_s_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["peak_rss_ratio"] = r["peak_rss"] / base["peak_rss"] if base["peak_rss"] else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": f"{platform.machine()}, "
            f"{platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores, no GPU (CPU, float32)",
            "profile": str(args.profile.relative_to(ROOT)), "baseline": base["strategy"], "command": " ".join(sys.argv)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.output
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Demo task per strategy — {meta['date']}, commit {commit}, {meta['machine']}; "
             f"ratios against `{base['strategy']}` in the same run (`python benchmarks/strategies.py`).", "",
             f"| run | held-out acc | held-out loss | train loss (last 10) | tokens/s | ×{base['strategy']} | "
             f"peak RSS MiB | ×{base['strategy']} | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "n/a"
        held = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "n/a"
        lines.append(f"| {r['strategy']} | {acc} | {held} | {r['final_loss']:.4f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_ratio']:.2f} | {r['peak_rss'] / 2**20:.0f} | "
                     f"{r['peak_rss_ratio']:.2f} | {r['wall_s']:.0f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
