"""lowmem-tune against HF Trainer's `optim="galore_adamw_layerwise"` (galore-torch 1.0), same
model, data and GaLore settings, in one invocation: tokens/s and the loss after 60 steps.

Configuration (the one the peer comparison was first measured in): a Llama with hidden 512,
4 layers, 8 heads, vocab 1000, random init saved once so both start from the same weights; a
byte-level BPE tokenizer trained on the data; text from a fixed Markov chain over 300 words,
packed to 256-token sequences; micro batch 4, no accumulation (HF refuses accumulation with
layerwise GaLore), 32-bit GaLore layerwise, rank 64, update_proj_gap 50, scale 0.25, constant lr
1e-3, no clipping (a no-op in HF's layerwise mode), float32 on the CPU. Each side runs in its own
process; runs alternate (ours, HF, ours, HF, ...) so drift of a shared machine hits both, and the
ratio is the median over the pairs. Tokens/s per step is tokens over the wall time between
consecutive step ends (data, forward, backward, optimizer, logging), the median over steps after
--warmup.

    python benchmarks/peer_hf_galore.py                 # 3 pairs of 80 steps
    python benchmarks/peer_hf_galore.py --pairs 5 --steps 100

Results: benchmarks/results/peer_hf_galore.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
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
SEQ_LEN, MICRO_BATCH, RANK, GAP, SCALE, LR = 256, 4, 64, 50, 0.25, 1e-3
LOSS_AT = 60


def prepare(work: Path) -> None:
    """The shared model directory (weights + tokenizer) and the text both sides train on."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from lowmem_tune.data import train_local_tokenizer

    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    successors = {w: rng.sample(words, 5) for w in words}
    lines = []
    for _ in range(4000):
        word, line = rng.choice(words), []
        for _ in range(60):
            line.append(word)
            word = rng.choice(successors[word])
        lines.append(" ".join(line))
    (work / "data.txt").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=1000, max_position_embeddings=SEQ_LEN,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "model")
    tokenizer = train_local_tokenizer(lines, 1000)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(work / "model")


def run_hf(work: Path, steps: int) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainerCallback, TrainingArguments)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    raw = load_dataset("text", data_files=str(work / "data.txt"), split="train")
    tokens = raw.map(lambda rows: tokenizer(rows["text"]), batched=True, remove_columns=["text"])

    def pack(rows: dict) -> dict:
        ids = [t for row in rows["input_ids"] for t in row]
        usable = len(ids) // SEQ_LEN * SEQ_LEN
        chunks = [ids[i:i + SEQ_LEN] for i in range(0, usable, SEQ_LEN)]
        return {"input_ids": chunks, "attention_mask": [[1] * SEQ_LEN for _ in chunks]}

    packed = tokens.map(pack, batched=True, remove_columns=tokens.column_names)
    ends: list[float] = []
    losses: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    args = TrainingArguments(
        output_dir=str(work / "hf"), max_steps=steps, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, optim="galore_adamw_layerwise", optim_target_modules=["self_attn", "mlp"],
        optim_args=f"rank={RANK}, update_proj_gap={GAP}, scale={SCALE}", logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    began = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=packed, callbacks=[Clock()],
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
    seconds = [b - a for a, b in zip([began] + ends, ends)]
    return {"seconds": seconds, "tokens": SEQ_LEN * MICRO_BATCH, "losses": losses}


def run_ours(work: Path, steps: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from lowmem_tune.profile import profile_from_dict
    from lowmem_tune.train import RunControl, run_training

    class Quiet:
        def emit(self, event: Any) -> None:
            pass

    out = work / f"ours-{time.time_ns()}"
    profile = profile_from_dict({
        "model": {"name": str(work / "model"), "dtype": "float32"}, "hardware": {"device": "cpu"},
        "strategy": {"name": "galore", "rank": RANK, "update_proj_gap": GAP, "scale": SCALE, "bits": 32,
                     "layerwise": True},
        "data": {"dataset": str(work / "data.txt"), "format": "text", "packing": True, "max_seq_len": SEQ_LEN,
                 "heldout": 0},
        "train": {"max_steps": steps, "micro_batch_size": MICRO_BATCH, "gradient_accumulation": 1, "lr": LR,
                  "scheduler": "constant", "warmup_steps": 0, "max_grad_norm": None, "seed": 0,
                  "activation_checkpointing": False, "save_every": 10**9, "eval_every": 10**9},
        "output": {"dir": str(out), "save_final": False},
    }, source="peer_hf_galore")
    run_training(profile, False, Quiet(), RunControl())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [m["elapsed_s"] for m in metrics]
    return {"seconds": [b - a for a, b in zip([0.0] + elapsed, elapsed)], "tokens": metrics[0]["tokens"],
            "losses": {m["step"]: m["loss"] for m in metrics}}


def summary(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    rates = [run["tokens"] / s for s in run["seconds"][warmup:]]
    losses = {int(k): v for k, v in run["losses"].items()}
    window = [losses[s] for s in range(LOSS_AT - 4, LOSS_AT + 1) if s in losses]
    return {"tokens_per_s": statistics.median(rates), "loss_at_60": statistics.mean(window) if window else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--child", choices=["hf", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= LOSS_AT:
        parser.error(f"--steps must be over {LOSS_AT}: the loss after {LOSS_AT} steps is half of the comparison")
    if args.child:
        result = (run_hf if args.child == "hf" else run_ours)(args.work, args.steps)
        args.result.write_text(json.dumps(result))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for pair in range(args.pairs):
            row = {"pair": pair}
            for side in ("ours", "hf"):
                result = work / f"{side}-{pair}.json"
                subprocess.run([sys.executable, __file__, "--child", side, "--work", str(work), "--steps",
                                str(args.steps), "--result", str(result)], check=True, env=env)
                row[side] = summary(json.loads(result.read_text()), args.warmup)
            row["ratio"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    ratio = statistics.median(r["ratio"] for r in rows)
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "transformers": transformers.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU, float32",
            "command": " ".join(["python", "benchmarks/peer_hf_galore.py", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peer_hf_galore.json").write_text(json.dumps({"meta": meta, "ratio": ratio, "rows": rows}, indent=2) + "\n")
    lines = [f"lowmem-tune vs HF Trainer `galore_adamw_layerwise` (transformers {meta['transformers']}, galore-torch "
             f"1.0) — {meta['date']}, commit {meta['commit']}, {meta['machine']} (`{meta['command']}`). Llama "
             f"hidden 512 x 4 layers, vocab 1000; rank {RANK}, T {GAP}, scale {SCALE}; micro batch {MICRO_BATCH} x "
             f"{SEQ_LEN} tokens; 32-bit GaLore layerwise; constant lr {LR}.", "",
             "| pair | ours tokens/s | HF tokens/s | ratio | ours loss @60 | HF loss @60 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['ours']['tokens_per_s']:.0f} | {r['hf']['tokens_per_s']:.0f} | "
                     f"{r['ratio']:.3f} | {r['ours']['loss_at_60']:.4f} | {r['hf']['loss_at_60']:.4f} |")
    lines += ["", f"Median ratio (ours / HF tokens/s): **{ratio:.3f}**"]
    (RESULTS / "peer_hf_galore.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
