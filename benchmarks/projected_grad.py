"""Layerwise GaLore's training step with and without projected weight gradients, at LLaMA-2-7B
decoder-layer shapes, as a ratio in one process.

One Llama decoder layer of llama-2-7b's shapes (hidden 4096, MLP 11008, 32 heads; vocab cut to
1000 so that the head does not dominate), random weights, a micro batch of --tokens tokens,
32-bit GaLore rank --rank, layerwise. `hook` builds the updater without the model's modules, so
every matrix forms its gradient and the post-accumulate-grad hook projects it (the path before
projected gradients); `projected` hands it the modules, so between refreshes the layer's backward
takes (dY P)ᵀ X. Both run the same steps (a first basis at step 0, then --steps steps with no
refresh: T is larger than the run, and --tokens > --rank so that the first basis is complete)
in alternation, and the figure is the median step time
(forward, backward, optimizer step) after step 0, and the ratio hook / projected. Also reported:
how many of the layer's matrices formed their gradient G in a step (the others were projected in
backward, which the optimizer's per-step state records).

    python benchmarks/projected_grad.py                    # CPU: 512 tokens, 5 steps
    python benchmarks/projected_grad.py --tokens 2048 --device cuda

Results: benchmarks/results/projected_grad[_cpu].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def build(device: torch.device, dtype: torch.dtype, rank: int, projected: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_tune.optim import GaLoreAdamW, GaLoreUpdater
    from lowmem_tune.strategies.galore import galore_matrices

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=1000, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    mats = galore_matrices(model)
    rest = [p for p in model.parameters() if all(p is not m for m in mats)]
    opt = GaLoreAdamW([{"params": mats, "rank": rank, "update_proj_gap": 10**6}, {"params": rest}], lr=1e-5)
    return model, mats, GaLoreUpdater(opt, None, layerwise=True, modules=list(model.modules()) if projected else ())


def step(model, mats, updater, ids: torch.Tensor, device: torch.device) -> tuple[float, int]:
    """Seconds of one training step, and how many of `mats` formed their full gradient in it."""
    began = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    formed = sum(not updater.optimizer.state[p].get("low_only", False) for p in mats)
    updater.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began, formed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.tokens <= args.rank:
        # a gradient of t tokens has rank <= t: the basis would stay incomplete and be filled at every step
        parser.error(f"--tokens must exceed --rank ({args.rank}) for steps without a refresh")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)
    runs = {side: build(device, dtype, args.rank, side == "projected") for side in ("hook", "projected")}
    times: dict[str, list[float]] = {side: [] for side in runs}
    formed: dict[str, int] = {}
    for index in range(args.steps + 1):
        for side, (model, mats, updater) in runs.items():
            seconds, formed[side] = step(model, mats, updater, ids, device)
            if index:  # step 0 takes every first basis, the same way on both sides
                times[side].append(seconds)
    median = {side: statistics.median(t) for side, t in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}"
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "device": where, "dtype": str(dtype),
              "tokens": args.tokens, "rank": args.rank, "steps": args.steps, "median_step_s": median,
              "gradients_formed_per_step": formed, "ratio": median["hook"] / median["projected"]}
    stem = "projected_grad" if device.type == "cuda" else "projected_grad_cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Layerwise GaLore step, one llama-2-7b-shaped decoder layer — {result['date']}, commit {result['commit']}, "
             f"{where}, {dtype}, {args.tokens} tokens, rank {args.rank} (`python benchmarks/projected_grad.py "
             f"--device {args.device} --tokens {args.tokens}`).", "",
             "| path | median step s | matrices forming G per step |", "|---|---|---|"]
    lines += [f"| {side} | {median[side]:.3f} | {formed[side]} |" for side in ("hook", "projected")]
    lines += ["", f"hook / projected step time: **{result['ratio']:.2f}x**"]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
