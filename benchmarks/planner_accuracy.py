"""Planner accuracy: analytic peak vs the peak measured on fake tensors (and on CUDA when present).

    OMP_NUM_THREADS=1 python benchmarks/planner_accuracy.py --models demo-llama llama-2-7b --seq-lens 512

Writes benchmarks/results/planner_accuracy{_TAG}.{json,md}. A measurement, not a test: nothing fails.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lowmem_tune.errors import UserError
from lowmem_tune.planner.architecture import resolve_architecture
from lowmem_tune.planner.estimate import Workload, estimate
from lowmem_tune.planner.verify import verify_profile
from lowmem_tune.profile import profile_from_dict

RESULTS = Path(__file__).parent / "results"


def cuda_peak(profile) -> int | None:
    """Peak allocated bytes of the same two steps on a real GPU with random weights, if there is one."""
    import torch

    if not torch.cuda.is_available():
        return None
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import enable_activation_checkpointing, load_model
    from lowmem_tune.strategies import StrategyContext, build_strategy

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    strategy = build_strategy(profile)
    ctx = StrategyContext(device=device, dtype=torch.bfloat16)
    model = load_model(resolve_model(profile.model.name), "random", torch.bfloat16, device)
    model = strategy.prepare_model(model, ctx)
    if profile.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    updater = strategy.build_updater(model, ctx)
    t = profile.train
    ids = torch.randint(0, model.config.vocab_size, (t.micro_batch_size, profile.data.max_seq_len), device=device)
    for step in range(2):
        strategy.on_step_start(step, model, updater)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        updater.set_lr(t.lr)
        updater.step()
    updater.close()
    peak = torch.cuda.max_memory_allocated()
    del model, updater
    return int(peak)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["demo-llama", "small-llama", "llama-2-7b"])
    parser.add_argument("--strategies", nargs="+", default=["full", "adamw8bit", "galore", "fira", "lisa", "owlore", "welore"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--tag", default="", help="a suffix for the result files (planner_accuracy_TAG.*)")
    args = parser.parse_args()
    checkpointing = not args.no_checkpointing
    rows = []
    for model in args.models:
        arch = resolve_architecture(model)
        for seq_len in args.seq_lens:
            for strategy in args.strategies:
                profile = profile_from_dict({
                    "model": {"name": model, "init": "random", "dtype": "bfloat16"},
                    "strategy": {"name": strategy},
                    "train": {"micro_batch_size": args.micro_batch, "gradient_accumulation": 2,
                              "activation_checkpointing": checkpointing},
                    "data": {"max_seq_len": seq_len},
                })
                analytic = estimate(profile.strategy, arch, Workload(seq_len, args.micro_batch, checkpointing))
                started = time.perf_counter()
                try:
                    measured = verify_profile(profile)
                except UserError as err:  # a strategy that cannot run on fake tensors yet
                    rows.append({"model": model, "strategy": strategy, "seq_len": seq_len, "error": str(err),
                                 "analytic_bytes": analytic.total})
                    print(f"{model:12} {strategy:9} seq {seq_len:5}: {err}", flush=True)
                    continue
                row = {"model": model, "strategy": strategy, "seq_len": seq_len, "micro_batch": args.micro_batch,
                       "checkpointing": checkpointing, "analytic_bytes": analytic.total, "analytic_phase": analytic.phase,
                       "fake_peak_bytes": measured.peak_bytes, "fake_peak_at": measured.peak_at,
                       "relative_error": analytic.total / measured.peak_bytes - 1,
                       "verify_seconds": time.perf_counter() - started, "cuda_peak_bytes": cuda_peak(profile),
                       "analytic": analytic.memory, "fake_by_category": measured.by_category}
                rows.append(row)
                print(f"{model:12} {strategy:9} seq {seq_len:5}: analytic {analytic.total / 2**30:7.3f} GiB, "
                      f"fake {measured.peak_bytes / 2**30:7.3f} GiB ({row['relative_error']:+.1%}), "
                      f"{row['verify_seconds']:.0f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "planner_accuracy" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | strategy | seq | analytic GiB | fake-tensor peak GiB | error | CUDA peak GiB | verify s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | {r['seq_len']} | {r['analytic_bytes'] / 2**30:.3f} | "
                         f"failed: {r['error']} | | | |")
            continue
        cuda = f"{r['cuda_peak_bytes'] / 2**30:.3f}" if r["cuda_peak_bytes"] else "n/a"
        lines.append(f"| {r['model']} | {r['strategy']} | {r['seq_len']} | {r['analytic_bytes'] / 2**30:.3f} | "
                     f"{r['fake_peak_bytes'] / 2**30:.3f} | {r['relative_error']:+.1%} | {cuda} | {r['verify_seconds']:.0f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
