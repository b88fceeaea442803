"""Bytes all-reduced per optimizer step, GaLore's low-rank averaging against plain DDP, and step
time on 2 CPU processes (gloo) against 1 process with the same global batch.

    python benchmarks/ddp_bytes.py [--steps 12] [--rank 32]

Measured on the demo model (profiles/demo.yaml, float32): in each process the tensors handed to
the all-reduce are counted — GaLore's through `World.average_` (split into full gradients and
low-rank accumulators / sketches), DDP's through a communication hook on its buckets (the default
all-reduce, counted). The expectation next to each figure comes from the planner's sizes
(planner/components.py), and the same sizes give Llama-2-7B's figures (rank 256, bf16).
Results: benchmarks/results/ddp_bytes.{json,md}.
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
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not


def _child(profile_file: Path, out: Path) -> None:
    """One process of a measured run: per step, the bytes it all-reduced and the step's seconds."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from lowmem_tune.profile import profile_from_dict
    from lowmem_tune.train import RunControl
    from lowmem_tune.train.distributed import World
    from lowmem_tune.train.run import TrainingRun

    counted = {"full gradients": 0, "low-rank and sketches": 0, "ddp buckets": 0}
    average = World.average_

    def counting_average(world: World, tensors: list[torch.Tensor]) -> None:
        grads = {id(p.grad) for p in run.model.parameters() if p.grad is not None}
        for t in tensors:
            key = "full gradients" if id(t) in grads else "low-rank and sketches"
            counted[key] += t.numel() * t.element_size()
        average(world, tensors)

    def counting_hook(state, bucket):  # noqa: ANN001 — DDP rejects any annotation but a real dist.GradBucket
        counted["ddp buckets"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    class CountedDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, counting_hook)

    class Quiet:
        def emit(self, event: Any) -> None:
            pass

    class MeasuredRun(TrainingRun):
        def train_step(self) -> dict[str, Any]:
            before = dict(counted)
            start = time.perf_counter()
            metrics = super().train_step()
            steps.append({"seconds": time.perf_counter() - start,
                          **{k: counted[k] - before[k] for k in counted}})
            return metrics

    World.average_ = counting_average
    torch.nn.parallel.DistributedDataParallel = CountedDDP
    steps: list[dict[str, Any]] = []
    run = MeasuredRun(profile_from_dict(json.loads(profile_file.read_text())), False, Quiet(), RunControl())
    try:
        run.setup()
        run.train()
    finally:
        run.cleanup()
    (out / f"rank{run.world.rank}.json").write_text(json.dumps(steps))


def _profile(strategy: dict[str, Any], micro: int, steps: int, out: Path) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load((ROOT / "profiles" / "demo.yaml").read_text())
    raw["strategy"] = strategy
    raw["model"]["dtype"] = "float32"
    raw["train"].update(max_steps=steps, micro_batch_size=micro, save_every=10_000, eval_every=10_000)
    raw["output"] = {"dir": str(out), "save_final": False}
    raw["eval"] = {"tasks": [], "baseline": False}
    raw["data"]["heldout"] = 0
    return raw


def _measure(strategy: dict[str, Any], processes: int, steps: int, work: Path) -> list[dict[str, Any]]:
    out = work / f"{strategy['name']}-{processes}"
    out.mkdir(parents=True)
    profile_file = out / "profile.json"
    profile_file.write_text(json.dumps(_profile(strategy, 32 // processes, steps, out)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    done = subprocess.run([*launcher, __file__, "--child", str(profile_file), str(out)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{strategy['name']} x{processes} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "rank0.json").read_text())


def expected_bytes(model: str, strategy: str, rank: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes a step all-reduces by the planner's sizes: DDP every trainable gradient; GaLore the
    low-rank accumulators (float32) of the decoder's matrices and the other tensors' gradients."""
    from lowmem_tune.planner.architecture import resolve_architecture
    from lowmem_tune.planner.components import galore_matrix

    arch = resolve_architecture(model)
    others = (arch.params - arch.num_layers * sum(lin.out_features * lin.in_features for lin in arch.linears))
    if strategy == "full":
        return {"ddp buckets": arch.params * dtype_bytes}
    low = arch.num_layers * sum(galore_matrix(lin, rank, dtype_bytes, 8)[2] for lin in arch.linears)
    return {"full gradients": others * dtype_bytes, "low-rank and sketches": low}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    strategies = {"galore": {"name": "galore", "rank": args.rank, "update_proj_gap": 10_000, "bits": 8,
                             "layerwise": True, "train_embeddings": True},
                  "full": {"name": "full", "train_embeddings": True}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, strategy in strategies.items():
            two = _measure(strategy, 2, args.steps, Path(tmp))
            one = _measure(strategy, 1, args.steps, Path(tmp))
            # the second half: past the first bases, which several processes spread over a few
            # steps (SketchRoom: the sketches wait for the step's averaging)
            steady = two[len(two) // 2:]
            sent = {k: int(statistics.median(s[k] for s in steady)) for k in two[0] if k != "seconds"}
            basis_steps = sum(1 for s in two if s["low-rank and sketches"] > sent["low-rank and sketches"])
            rows.append({
                "strategy": name, "first_step_bytes": {k: v for k, v in two[0].items() if k != "seconds"},
                "first_basis_steps": basis_steps,
                "steady_step_bytes": sent, "steady_total_bytes": sum(sent.values()),
                "expected_steady_bytes": expected_bytes("demo-llama", name, args.rank, 4),
                "step_seconds_2_processes": statistics.median(s["seconds"] for s in steady),
                "step_seconds_1_process": statistics.median(s["seconds"] for s in one[len(one) // 2:]),
            })
    galore, full = rows
    llama = {name: expected_bytes("llama-2-7b", name, 256, 2) for name in ("galore", "full")}
    result = {
        "date": time.strftime("%Y-%m-%d"), "commit": _commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python benchmarks/ddp_bytes.py " + " ".join(sys.argv[1:]), "rank": args.rank, "steps": args.steps,
        "measured": rows, "galore_over_ddp": galore["steady_total_bytes"] / full["steady_total_bytes"],
        "llama_2_7b_rank_256_bf16": llama,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ddp_bytes.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "ddp_bytes.md").write_text(_markdown(result))
    print(_markdown(result))


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"Bytes all-reduced per optimizer step, 2 processes (gloo) — {r['date']}, commit {r['commit']}, "
             f"{r['machine']} (`{r['command']}`)", "",
             f"Demo model (float32, micro batch 16 per process), median of steps {r['steps'] // 2 + 1}-{r['steps']}; "
             f"GaLore rank {r['rank']}:", "",
             "| strategy | full gradients | low-rank + sketches | DDP buckets | total | planner's sizes | first step "
             "| step time, 2 processes / 1 |", "|---|---|---|---|---|---|---|---|"]
    for row in r["measured"]:
        s = row["steady_step_bytes"]
        lines.append(f"| {row['strategy']} | {_mb(s['full gradients'])} | {_mb(s['low-rank and sketches'])} | "
                     f"{_mb(s['ddp buckets'])} | {_mb(row['steady_total_bytes'])} | "
                     f"{_mb(sum(row['expected_steady_bytes'].values()))} | {_mb(sum(row['first_step_bytes'].values()))} | "
                     f"{row['step_seconds_2_processes'] / row['step_seconds_1_process']:.2f} "
                     f"({row['step_seconds_2_processes']:.3f} s / {row['step_seconds_1_process']:.3f} s) |")
    g, f = (sum(v.values()) for v in r["llama_2_7b_rank_256_bf16"].values())
    first = r["measured"][0]["first_basis_steps"]
    lines += ["", f"GaLore's first bases took {first} steps with 2 processes (their sketches wait for the step's "
              "averaging, so SketchRoom admits as many as the accumulators' room at a time; the rest drop that "
              "step's gradient and take their basis a step later).",
              "", f"GaLore sends {r['galore_over_ddp']:.2f}x of DDP's bytes on the demo model (its embeddings, "
              "trained in full here, are most of it). By the same sizes, Llama-2-7B at rank 256 in bf16: GaLore "
              f"{_mb(g)} a step (float32 accumulators and the embeddings' bf16 gradients) against DDP's {_mb(f)}: "
              f"{g / f:.3f}x.", ""]
    return "\n".join(lines)


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
