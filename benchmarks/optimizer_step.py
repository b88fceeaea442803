"""Optimizer step time at LLaMA-2-7B decoder-layer shapes, as ratios in one process.

Contenders, each stepping the seven matrices of one decoder layer (q, k, v, o 4096x4096; gate, up
11008x4096; down 4096x11008) from fixed gradients:
  torch AdamW, bitsandbytes AdamW8bit, galore-torch 1.0 GaLoreAdamW (and GaLoreAdamW8bit where it
  runs: it needs CUDA), and ours: GaLoreAdamW 32/8-bit with full or randomized SVD, staggered.
T is twice the number of matrices. For every contender: `steady` = median step time between
refreshes, `refresh_max` = the slowest step over one refresh window of T steps (galore-torch
refreshes all matrices on the same step; ours spreads them, one matrix every other step),
`window_mean` = mean step time over that window, `first_step` = step 0 (every matrix needs a first
basis; ours takes it with the randomized SVD when staggered). Ratios are against
bitsandbytes AdamW8bit's steady step. On a CPU the shapes are divided by --shrink (default 8) so
that a run takes minutes, and torch uses --threads 1 (the CPU is shared); on CUDA they are the real
shapes (--shrink 1).

  python benchmarks/optimizer_step.py            # timings -> results/optimizer_step[_cpu].json/.md
  python benchmarks/optimizer_step.py --moments  # keep/project/reset on a small synthetic task

The --moments task: a tiny Llama (catalog `tiny-llama`, random init) learns next-token prediction on
sequences from a fixed random first-order Markov chain (64 states, 4 likely successors each), GaLore
rank 8 with T = 10 so that the run crosses many subspace changes; the score is the mean training
loss over the last 20 of 150 steps, averaged over 3 seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
LLAMA2_7B_LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                   "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
                   "down_proj": (4096, 11008)}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def contenders(rank: int, gap: int, device: torch.device):
    import bitsandbytes as bnb

    from lowmem_tune.optim import GaLoreAdamW, GaLoreConfig

    def galore_group(params):
        return [{"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}]

    def reference(params, bits):
        from galore_torch import GaLoreAdamW as Ref32
        from galore_torch import GaLoreAdamW8bit as Ref8

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if bits == 8:
                return Ref8(galore_group(params), lr=1e-3)
            return Ref32(galore_group(params), lr=1e-3, no_deprecation_warning=True)

    def ours(params, bits, svd):
        groups = galore_group(params)
        groups[0]["svd"] = svd
        return GaLoreAdamW(groups, lr=1e-3, config=GaLoreConfig(bits=bits, stagger=True))

    return {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "bnb AdamW8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3),
        "galore-torch 32-bit": lambda ps: reference(ps, 32),
        "galore-torch 8-bit": lambda ps: reference(ps, 8),
        "ours 32-bit full-SVD": lambda ps: ours(ps, 32, "full"),
        "ours 8-bit full-SVD": lambda ps: ours(ps, 8, "full"),
        "ours 8-bit randomized-SVD": lambda ps: ours(ps, 8, "randomized"),
    }


def time_contender(make, shapes, device, dtype, gap, warm_windows: int):
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype, generator=gen) * 0.02) for s in shapes]
    grads = [torch.randn(s, device=device, dtype=dtype, generator=gen) * 1e-3 for s in shapes]
    opt = make(params)
    times = []
    for _ in range((warm_windows + 1) * gap):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    first, window = times[0], times[-gap:]
    # T = 2 x matrices: galore-torch refreshes all on one step of the window, ours one matrix on every
    # other step, so the faster half of the window are steps without any refresh for everyone.
    steady = statistics.median(sorted(window)[: gap // 2])
    return {"first_step_s": first, "steady_s": steady, "refresh_max_s": max(window),
            "window_mean_s": sum(window) / len(window)}


def run_timings(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shrink = args.shrink or (1 if device.type == "cuda" else 8)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(m // shrink, n // shrink) for m, n in LLAMA2_7B_LAYER.values()]
    rank = max(8, args.rank // shrink)
    gap = 2 * len(shapes)  # staggered phases: one matrix refreshes on every other step
    if device.type == "cpu":
        torch.set_num_threads(args.threads)  # a shared CPU: oversubscribed threads make timings meaningless
    results = {}
    for name, make in contenders(rank, gap, device).items():
        try:
            results[name] = time_contender(make, shapes, device, dtype, gap, args.windows)
        except Exception as err:  # e.g. galore-torch 8-bit asserts CUDA
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
        print(name, results[name], flush=True)
    base = results["bnb AdamW8bit"]["steady_s"]
    for row in results.values():
        if "steady_s" in row:
            row["steady_vs_bnb8bit"] = row["steady_s"] / base
            row["refresh_max_vs_bnb8bit"] = row["refresh_max_s"] / base
    report = {"machine": machine(device), "device": device.type, "dtype": str(dtype), "shrink": shrink,
              "shapes": shapes, "rank": rank, "update_proj_gap": gap, "torch": torch.__version__,
              "windows_timed": args.windows + 1, "results": results}
    suffix = "" if device.type == "cuda" else "_cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"optimizer_step{suffix}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Optimizer step, one LLaMA-2-7B decoder layer (shapes / {shrink}), rank {rank}, T {gap}",
             "", f"Machine: {report['machine']}; dtype {dtype}; torch {torch.__version__}.",
             "Ratios against bitsandbytes AdamW8bit's steady step, measured in the same process.", "",
             "| optimizer | steady step (ms) | x bnb8bit | first step (ms) | slowest step in T (ms) | x bnb8bit | mean over T (ms) |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | fails: {row['error']} | | | | | |")
            continue
        lines.append(f"| {name} | {row['steady_s'] * 1e3:.1f} | {row['steady_vs_bnb8bit']:.2f} | "
                     f"{row['first_step_s'] * 1e3:.1f} | {row['refresh_max_s'] * 1e3:.1f} | "
                     f"{row['refresh_max_vs_bnb8bit']:.2f} | {row['window_mean_s'] * 1e3:.1f} |")
    (RESULTS / f"optimizer_step{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------- moments policy


def markov_batches(steps: int, batch: int, seq: int, seed: int):
    gen = torch.Generator().manual_seed(1234)  # the chain is fixed; the seed varies the samples
    states = 64
    successors = torch.randint(0, states, (states, 4), generator=gen)
    sample_gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, states, (batch,), generator=sample_gen)
        for t in range(1, seq):
            pick = torch.randint(0, 4, (batch,), generator=sample_gen)
            x[:, t] = successors[x[:, t - 1], pick]
        yield x


def run_moments(args) -> None:
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import load_model
    from lowmem_tune.optim import GaLoreAdamW, GaLoreConfig, GaLoreUpdater
    from lowmem_tune.strategies.galore import galore_matrices

    steps, tail = 150, 20
    scores: dict[str, list[float]] = {}
    for seed in range(3):
        for policy in ("keep", "project", "reset"):
            model = load_model(resolve_model("tiny-llama"), "random", torch.float32, torch.device("cpu"), seed=seed)
            mats = galore_matrices(model)
            chosen = {id(p) for p in mats}
            rest = [p for p in model.parameters() if id(p) not in chosen]
            opt = GaLoreAdamW([{"params": mats, "rank": 8, "update_proj_gap": 10, "scale": 1.0}, {"params": rest}],
                              lr=3e-3, config=GaLoreConfig(moments=policy, stagger=True))
            updater = GaLoreUpdater(opt, max_grad_norm=1.0, layerwise=True)
            losses = []
            for x in markov_batches(steps, 8, 32, seed):
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                updater.step()
                losses.append(float(loss))
            scores.setdefault(policy, []).append(sum(losses[-tail:]) / tail)
            print(policy, seed, scores[policy][-1], flush=True)
    summary = {p: {"mean_tail_loss": statistics.mean(v), "per_seed": v} for p, v in scores.items()}
    best = min(summary, key=lambda p: summary[p]["mean_tail_loss"])
    report = {"task": "tiny-llama, Markov-chain next-token, rank 8, T 10, lr 3e-3, 150 steps, 3 seeds",
              "score": f"mean training loss over the last {tail} steps", "results": summary, "best": best,
              "uniform_entropy_nats": math.log(4)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optimizer_step_moments.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moments", action="store_true", help="compare the moment policies instead")
    parser.add_argument("--shrink", type=int, default=0, help="divide the 7B shapes by this (0: 8 on CPU, 1 on CUDA)")
    parser.add_argument("--rank", type=int, default=1024, help="rank at full shapes (divided by --shrink)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    parser.add_argument("--windows", type=int, default=1, help="warm-up windows of T steps before the timed one")
    args = parser.parse_args()
    run_moments(args) if args.moments else run_timings(args)


if __name__ == "__main__":
    main()
