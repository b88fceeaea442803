"""Throughput and peak memory of WeLore-50% LRC-only training against full finetuning, as ratios.

    OMP_NUM_THREADS=1 python benchmarks/welore.py [--models tiny-llama small-llama] [--steps 6]

For each model, two configurations train the same random-token batches with AdamW, activation
checkpointing off: `full` (every weight) and `welore` (ERR 0.5, LRC factors + norms trainable, the
rest frozen) — both through the real strategies (`prepare_model`, `build_updater`, `step`). The
WeLore ranks are `assumed_ranks` (the published LLaMA structure: q, k, o, gate low-rank), because
the spectra of these random-init models are flat and would make every matrix an LRC; the factors are
the truncated SVDs of the random weights, saved with `save_compressed` by this (parent) process and
loaded by the measured one as `model.name: <compressed dir>`, as a user would.

Each configuration runs in its own subprocess (so the process peak is its own). Measured:
tokens/s over the steps after `--warmup`; peak memory as torch.cuda.max_memory_allocated on a GPU,
else the process's peak RSS (ru_maxrss, which includes the ~0.3–0.5 GB of the Python + torch
runtime); and the training-state bytes (weights + gradients + optimizer state, counted from the
tensors). Ratios are welore / full from the same run. Writes benchmarks/results/welore.json and
welore.md. A measurement, not a test: it never fails on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _profile(model: str, strategy: dict, out_dir: str):
    from lowmem_tune.profile import profile_from_dict

    return profile_from_dict({
        "model": {"name": model, "init": "random"},
        "strategy": strategy,
        "train": {"lr": 1e-4, "max_grad_norm": 1.0, "activation_checkpointing": False},
        "output": {"dir": out_dir},
    })


def _compressed_directory(model_name: str, dtype: torch.dtype, where: Path) -> Path:
    """The random-init model factorized at the assumed 50% ranks, saved as `compress` would."""
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.compress import assumed_ranks, factorize, save_compressed
    from lowmem_tune.modeling import load_model

    resolved = resolve_model(model_name)
    dense = load_model(resolved, "random", dtype, torch.device("cpu"))
    plan = assumed_ranks(resolved.config, 0.5, 0.5)
    factorize(dense, plan.lrc_ranks)
    save_compressed(dense, plan, where)
    return where


def measure_one(model_name: str, method: str, compressed: str | None, steps: int, warmup: int, batch: int,
                seq: int) -> dict:
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.compress.storage import trainable_summary
    from lowmem_tune.modeling import load_model, pick_device, resolve_dtype
    from lowmem_tune.strategies import StrategyContext, build_strategy

    device = pick_device("auto")
    dtype = resolve_dtype("auto", device)
    tmp = Path(tempfile.mkdtemp(prefix="welore-bench-"))
    strategy_cfg = {"name": "welore", "optimizer": "adamw"} if method == "welore" else {"name": "full"}
    profile = _profile(model_name, strategy_cfg, str(tmp / "run"))
    resolved = resolve_model(model_name)
    if method == "welore":
        model = load_model(resolve_model(compressed), "pretrained", dtype, device)
    else:
        model = load_model(resolved, "random", dtype, device)
    strategy = build_strategy(profile)
    ctx = StrategyContext(device=device, dtype=dtype, cache_dir=tmp / "cache")
    model = strategy.prepare_model(model, ctx).train()
    updater = strategy.build_updater(model, ctx)
    trainable, total = trainable_summary(model)

    gen = torch.Generator().manual_seed(0)
    vocab = resolved.config.vocab_size
    batches = [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(steps + warmup)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = 0.0
    for i, ids in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        updater.set_lr(1e-4)
        updater.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - began
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    result = {
        "model": model_name, "method": method, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "tokens_per_s": steps * batch * seq / elapsed,
        "parameters": total, "trainable_parameters": trainable,
        "training_state_bytes": param_bytes + grad_bytes + updater.state_bytes(),
        "peak_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    if method == "welore":
        result["strategy"] = {k: v for k, v in strategy.describe().items() if k != "matrices"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "small-llama"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--compressed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.compressed, args.steps, args.warmup, args.batch, args.seq)))
        return

    from lowmem_tune.modeling import pick_device, resolve_dtype

    dtype = resolve_dtype("auto", pick_device("auto"))
    workdir = Path(tempfile.mkdtemp(prefix="welore-bench-"))
    rows = []
    for model in args.models:
        compressed = _compressed_directory(model, dtype, workdir / model)
        for method in ("full", "welore"):
            command = [sys.executable, __file__, "--one", model, method, "--compressed", str(compressed),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                       "--seq", str(args.seq)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{model:12s} {method:7s} {rows[-1]['tokens_per_s']:10.0f} tok/s  "
                  f"peak {rows[-1]['peak_bytes'] / 2**20:8.1f} MiB  state {rows[-1]['training_state_bytes'] / 2**20:8.1f} MiB")
    ratios = []
    for model in args.models:
        full = next(r for r in rows if r["model"] == model and r["method"] == "full")
        welore = next(r for r in rows if r["model"] == model and r["method"] == "welore")
        ratios.append({
            "model": model,
            "throughput_ratio": welore["tokens_per_s"] / full["tokens_per_s"],
            "peak_memory_ratio": welore["peak_bytes"] / full["peak_bytes"],
            "training_state_ratio": welore["training_state_bytes"] / full["training_state_bytes"],
            "trainable_share": welore["trainable_parameters"] / full["parameters"],
        })
    report = {
        "setup": {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "seq": args.seq,
                  "torch": torch.__version__, "machine": platform.machine(),
                  "threads": os.environ.get("OMP_NUM_THREADS", "default")},
        "runs": rows, "ratios_welore_over_full": ratios,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "welore.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| model | device | tokens/s ratio | peak memory ratio | training-state ratio | trainable share |",
             "|---|---|---|---|---|---|"]
    for r in ratios:
        device = next(x["device"] for x in rows if x["model"] == r["model"])
        lines.append(f"| {r['model']} | {device} | {r['throughput_ratio']:.2f}× | {r['peak_memory_ratio']:.2f}× | "
                     f"{r['training_state_ratio']:.2f}× | {r['trainable_share']:.1%} |")
    (RESULTS / "welore.md").write_text("WeLore-50% LRC-only / full finetuning (AdamW), same run:\n\n"
                                       + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
