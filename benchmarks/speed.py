"""Training and evaluation speed on a real model, every figure a ratio between runs made by one
invocation on one machine, the sides alternating so drift of a shared machine hits them all.

Model: Gemma 3 270M (dequantized Q4_K_M, `real_assets.py`). Data: BoolQ validation rows in the
boolq format (passage, question, " yes"/" no"; loss on the answer only), 256 tokens.

Training (tokens/s, median over the steps after --warmup; the loss of each step):
- `before`: the code at --before (default 51229a2, the commit before the speed work), float32 —
  the configuration the speed issue measured: galore, 8-bit moments, layerwise, micro batch 4,
  activation checkpointing.
- `fp32` and `auto`: this checkout with the same profile in float32, and with `model.dtype:
  auto` (bf16 on a CPU with AMX / AVX512-BF16).
- `hf`: HF Trainer with `optim="galore_adamw_layerwise"` (galore-torch 1.0; its 8-bit variant
  calls torch.cuda.synchronize() and cannot run on a CPU) on the very same micro-batches in the
  same order, weights in the precision `auto` chose, same rank, gap, scale,
  lr and checkpointing (HF refuses accumulation with layerwise GaLore; none is used here). HF's
  loss multiplies every position by the head; ours, the target positions only.
- `auto 32-bit`: ours with 32-bit optimizer states (`strategy.bits: 32`), as HF's.

Evaluation (BoolQ zero-shot, --eval-rows rows, batch 8; examples/s over the scoring alone, model
loading excluded; accuracy; per-row agreement with lm-evaluation-harness):
- `before` (float32, no BOS: the old encoding), `fp32` and `auto` as above;
- `lm-eval` 0.4.13 in float32 and in the `auto` precision, from the Python of another virtual
  environment (--lm-eval-python; lm_eval's pins clash with this project's).
Peak memory of the held-out loss (`eval_loss`) on 2 batches, before and after: the peak resident
set of a process that loads the model and runs it, minus the resident set after loading.

    python benchmarks/speed.py --lm-eval-python /path/to/venv/bin/python
    python benchmarks/speed.py --pairs 1 --steps 6 --skip-eval   # training only
    python benchmarks/speed.py --before COMMIT --before-dtype auto --sides before auto --skip-eval --tag NAME
        # an A/B of two commits at the same precision (results/speed_NAME.{json,md})

Results: benchmarks/results/speed.{json,md} (speed_TAG.{json,md} with --tag).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN, MICRO_BATCH, RANK, GAP, SCALE, LR = 256, 4, 128, 200, 0.25, 1e-5


def profile_dict(model: Path, data: Path, out: Path, dtype: str, steps: int, heldout: int = 0,
                 bits: int = 8) -> dict[str, Any]:
    """The training profile every side runs; no held-out loss (`heldout` is for the memory child)."""
    return {
        "model": {"name": str(model), "dtype": dtype}, "hardware": {"device": "cpu"},
        "strategy": {"name": "galore", "rank": RANK, "update_proj_gap": GAP, "scale": SCALE, "bits": bits,
                     "layerwise": True},
        "data": {"dataset": str(data), "format": "boolq", "max_seq_len": SEQ_LEN, "heldout": heldout},
        "train": {"max_steps": steps, "micro_batch_size": MICRO_BATCH, "gradient_accumulation": 1, "lr": LR,
                  "scheduler": "constant", "activation_checkpointing": True, "seed": 0, "save_every": 10**9,
                  "eval_every": 10**9, "log_every": 1},
        "output": {"dir": str(out), "save_final": False},
    }


def boolq_jsonl(work: Path, rows: int | None) -> Path:
    """BoolQ validation rows as JSONL with `label` (what every side, old code included, reads)."""
    import datasets

    from real_assets import task_data

    path = work / f"boolq-{rows}.jsonl"
    if not path.exists():
        table = datasets.load_from_disk(str(task_data("boolq")))
        table = table.select(range(rows)) if rows else table
        path.write_text("".join(json.dumps({**r, "label": int(r["answer"])}) + "\n" for r in table))
    return path


# --------------------------------------------------------------------------- children


def child_train(args: argparse.Namespace) -> dict[str, Any]:
    from lowmem_tune.profile import profile_from_dict
    from lowmem_tune.train import RunControl, run_training

    class Quiet:
        def emit(self, event: Any) -> None:
            pass

    out = args.work / f"run-{time.time_ns()}"
    profile = profile_from_dict(profile_dict(args.model, args.data, out, args.dtype, args.steps, bits=args.bits),
                                source="speed")
    run_training(profile, False, Quiet(), RunControl())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [m["elapsed_s"] for m in metrics]
    return {"seconds": [b - a for a, b in zip([0.0] + elapsed, elapsed)], "tokens": [m["tokens"] for m in metrics],
            "losses": [m["loss"] for m in metrics], "dtype": args.dtype}


def child_hf_train(args: argparse.Namespace) -> dict[str, Any]:
    """HF Trainer on the very micro-batches our run takes, in its order (our pipeline tokenizes,
    pads and orders them; HF's sampler is sequential over them)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import resolve_dtype
    from lowmem_tune.profile import profile_from_dict
    from lowmem_tune.train.setup import prepare_data

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    profile = profile_from_dict(profile_dict(args.model, args.data, args.work / "hf", args.dtype, args.steps))
    data = prepare_data(profile, resolve_model(str(args.model)), args.work / "hf")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    ends: list[float] = []
    losses: list[float] = []
    batches = [data.stream.next_batch() for _ in range(args.steps)]
    tokens = [int(b["attention_mask"].sum()) for b in batches]

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    training = TrainingArguments(
        output_dir=str(args.work / "hf-out"), max_steps=args.steps, per_device_train_batch_size=1,
        train_sampling_strategy="sequential",
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, optim="galore_adamw_layerwise", optim_target_modules=["self_attn", "mlp"],
        optim_args=f"rank={RANK}, update_proj_gap={GAP}, scale={SCALE}", logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
    )
    began = time.perf_counter()
    Trainer(model=model, args=training, train_dataset=batches, data_collator=lambda rows: rows[0],
            callbacks=[Clock()]).train()
    seconds = [b - a for a, b in zip([began] + ends, ends)]
    return {"seconds": seconds, "tokens": tokens, "losses": losses, "dtype": str(dtype)}


def child_eval(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_tune.evaluation.cards import load_card
    from lowmem_tune.evaluation.runner import run_task
    from lowmem_tune.modeling import resolve_dtype

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    began = time.perf_counter()
    scores, _ = run_task(model, tokenizer, load_card("boolq"), data_file=str(args.data), batch_size=8)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "rows": len(scores.predictions), "correct": scores.per_row["acc"], "dtype": str(dtype)}


def child_lm_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in lm-evaluation-harness' own environment: the BoolQ task as its yaml has it, on our rows."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = args.work / "lm_eval_tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "boolq_local.yaml").write_text(
        "task: boolq_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {args.data}\noutput_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"\ndoc_to_target: label\n'
        'doc_to_choice: ["no", "yes"]\nmetric_list:\n  - metric: acc\n')
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = HFLM(pretrained=str(args.model), dtype=dtype, batch_size=8, device="cpu")
    began = time.perf_counter()
    out = simple_evaluate(model=model, tasks=["boolq_local"], task_manager=TaskManager(include_path=str(tasks)),
                          log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - began
    samples = sorted(out["samples"]["boolq_local"], key=lambda s: s["doc_id"])
    return {"seconds": seconds, "rows": len(samples), "correct": [float(s["acc"]) for s in samples],
            "dtype": args.dtype}


def child_eval_loss_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak resident set of the held-out loss over 2 batches, above the resident set after loading."""
    import psutil
    import torch

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.data import eval_batches
    from lowmem_tune.loss import causal_lm_loss
    from lowmem_tune.modeling import load_model
    from lowmem_tune.profile import profile_from_dict
    from lowmem_tune.train.setup import prepare_data

    profile = profile_from_dict(profile_dict(args.model, args.data, args.work / "mem", args.dtype, 1, heldout=200))
    resolved = resolve_model(str(args.model))
    data = prepare_data(profile, resolved, args.work / "mem")
    model = load_model(resolved, "pretrained", torch.float32, torch.device("cpu"))  # parameters trainable, as in a run
    loaded = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set (VmHWM) starts again from here
    model.eval()
    with torch.no_grad():
        losses = [float(causal_lm_loss(model, b)) for b in eval_batches(data.heldout_items, MICRO_BATCH, data.pad_id, 2)]
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    return {"above_loaded_bytes": peak - loaded, "loss": statistics.mean(losses)}


def child_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Where a step's time goes (seconds per step, after --warmup steps), and the matmul rate."""
    import torch

    import lowmem_tune.optim.galore_adamw as galore_adamw
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import resolve_dtype
    from lowmem_tune.profile import profile_from_dict
    from lowmem_tune.train import RunControl
    from lowmem_tune.train.run import TrainingRun

    seconds: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            began = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - began
        return wrapper

    galore_adamw.dense_step = timed("optimizer: AdamW on the dense tensors (the tied embedding)", galore_adamw.dense_step)
    galore_adamw.galore_step = timed("optimizer: GaLore matrices", galore_adamw.galore_step)
    galore_adamw.GaLoreAdamW.step_clipped = timed("optimizer: all", galore_adamw.GaLoreAdamW.step_clipped)
    torch.Tensor.backward = timed("backward (with recompute, GaLore's hooks)", torch.Tensor.backward)

    class Quiet:
        def emit(self, event: Any) -> None:
            pass

    raw = profile_dict(args.model, args.data, args.work / f"parts-{time.time_ns()}", args.dtype, 10**6)
    run = TrainingRun(profile_from_dict(raw), False, Quiet(), RunControl())
    run.setup()
    try:
        for _ in range(args.warmup):
            run.train_step()
        seconds.clear()
        tokens, began = 0, time.perf_counter()
        for _ in range(args.steps):
            tokens += run.train_step()["tokens"]
        total = time.perf_counter() - began
    finally:
        run.cleanup()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    a, b = torch.randn(2048, 640, dtype=dtype), torch.randn(640, 8192, dtype=dtype)
    a @ b
    began = time.perf_counter()
    for _ in range(10):
        a @ b
    rate = 10 * 2 * 2048 * 640 * 8192 / (time.perf_counter() - began)
    config = resolve_model(str(args.model)).config
    embedding = config.vocab_size * config.hidden_size
    decoder = sum(p.numel() for p in run.model.parameters()) - embedding
    return {"step_s": total / args.steps, "tokens_per_step": tokens / args.steps,
            "parts_s": {k: v / args.steps for k, v in seconds.items()}, "matmul_flops": rate,
            # forward + backward + the recompute of activation checkpointing: 8 multiply-adds per weight and token
            "decoder_matmul_s": 8 * decoder * tokens / args.steps / rate, "dtype": str(dtype)}


CHILDREN = {"train": child_train, "breakdown": child_breakdown, "hf-train": child_hf_train, "eval": child_eval, "lm-eval": child_lm_eval,
            "eval-loss-memory": child_eval_loss_memory}


# --------------------------------------------------------------------------- parent


TRAIN_SIDES = ("before", "fp32", "auto", "auto 32-bit", "hf")


def run_child(kind: str, python: str, tree: Path, work: Path, model: Path, data: Path, dtype: str,
              steps: int = 0, warmup: int = 2, bits: int = 8) -> dict[str, Any]:
    """One side in its own process, from the copy of this script in `tree` (the commit measured)."""
    result = work / f"{kind}-{time.time_ns()}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT / "benchmarks")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([python, str(work / "speed.py"), "--child", kind, "--work", str(work), "--model", str(model),
                    "--data", str(data), "--dtype", dtype, "--steps", str(steps), "--warmup", str(warmup),
                    "--bits", str(bits), "--result", str(result)], check=True, env=env, cwd=work)
    return json.loads(result.read_text())


def tokens_per_s(run: dict[str, Any], warmup: int) -> float:
    return statistics.median(t / s for t, s in list(zip(run["tokens"], run["seconds"]))[warmup:])


def checkout(commit: str, into: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(into), commit], check=True, cwd=ROOT,
                   capture_output=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="51229a2", help="the commit measured as `before`")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--lm-eval-python", default=None, help="python of a venv with lm_eval==0.4.13")
    parser.add_argument("--before-dtype", default="float32", choices=["float32", "auto"],
                        help="the precision of the `before` training side (auto: an A/B of two commits)")
    parser.add_argument("--sides", nargs="+", default=list(TRAIN_SIDES), choices=TRAIN_SIDES,
                        help="the training sides to run (default: all)")
    parser.add_argument("--tag", default="", help="a suffix for the result files (speed_TAG.{json,md})")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for hidden in ("--work", "--model", "--data", "--result"):
        parser.add_argument(hidden, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.result.write_text(json.dumps(CHILDREN[args.child](args)))
        return

    from real_assets import gemma_model

    from lowmem_tune.modeling import resolve_dtype

    import torch

    auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    model, py = gemma_model(), sys.executable
    report: dict[str, Any] = {"train": [], "eval": [], "memory": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(Path(__file__), work / "speed.py")  # this script as it started, whatever the checkout becomes
        before = checkout(args.before, work / "before")
        after = checkout("HEAD", work / "after")  # the committed code: edits made meanwhile do not leak in
        report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=after).stdout.strip()
        try:
            train_data = boolq_jsonl(work, None)  # JSONL, which the code at --before reads too
            if not args.skip_train:
                for pair in range(args.pairs):
                    row: dict[str, Any] = {"pair": pair}
                    for side, tree, dtype, kind, bits in (
                            ("before", before, args.before_dtype, "train", 8), ("fp32", after, "float32", "train", 8),
                            ("auto", after, "auto", "train", 8), ("auto 32-bit", after, "auto", "train", 32),
                            ("hf", after, auto, "hf-train", 32)):
                        if side not in args.sides:
                            continue
                        run = run_child(kind, py, tree, work, model, train_data, dtype, args.steps, args.warmup, bits)
                        row[side] = {"tokens_per_s": tokens_per_s(run, args.warmup), "losses": run["losses"]}
                        print(side, round(row[side]["tokens_per_s"], 1), flush=True)
                    report["train"].append(row)
                report["breakdown"] = run_child("breakdown", py, after, work, model, train_data, "auto", args.steps,
                                                args.warmup)
            if not args.skip_eval:
                rows = boolq_jsonl(work, args.eval_rows)
                sides = [("before", py, before, "float32", "eval"), ("fp32", py, after, "float32", "eval"),
                         ("auto", py, after, auto, "eval")]
                if args.lm_eval_python:
                    sides += [("lm-eval fp32", args.lm_eval_python, after, "float32", "lm-eval"),
                              (f"lm-eval {auto}", args.lm_eval_python, after, auto, "lm-eval")]
                for pair in range(args.pairs):
                    row = {"pair": pair}
                    for side, python, tree, dtype, kind in sides:
                        run = run_child(kind, python, tree, work, model, rows, dtype)
                        row[side] = {"examples_per_s": run["rows"] / run["seconds"], "correct": run["correct"]}
                        print(side, round(row[side]["examples_per_s"], 2), sum(run["correct"]) / run["rows"], flush=True)
                    report["eval"].append(row)
                for side, tree in (("before", before), ("after", after)):
                    report["memory"][side] = run_child("eval-loss-memory", py, tree, work, model, train_data, "float32")
        finally:
            for tree in (before, after):
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    write_results(report, args, auto)


def write_results(report: dict[str, Any], args: argparse.Namespace, auto: str) -> None:
    import transformers

    commit = report.pop("commit")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "before": args.before, "before_dtype": args.before_dtype,
            "transformers": transformers.__version__, "cpu": cpu, "cores": os.cpu_count(), "auto_dtype": auto,
            "command": " ".join(["python", "benchmarks/speed.py", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "speed" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, **report}, indent=2) + "\n")
    lines = [f"Speed on Gemma 3 270M (dequantized Q4_K_M), BoolQ — {meta['date']}, commit {meta['commit']} "
             f"(before: {meta['before']}), {cpu}, {meta['cores']} cores, transformers {meta['transformers']}; "
             f"`auto` is {auto} here (`{meta['command']}`).", ""]
    if report["train"]:
        sides = [s for s in TRAIN_SIDES if s in report["train"][0]]
        ratios = [(a, b) for a, b in (("auto", "before"), ("auto", "hf"), ("auto 32-bit", "hf")) if {a, b} <= set(sides)]
        names = {"before": f"before ({args.before_dtype})", "auto 32-bit": "auto, 32-bit states", "hf": "HF Trainer"}
        lines += [f"Training: galore, 8-bit moments, layerwise, rank {RANK}, micro batch {MICRO_BATCH} x {SEQ_LEN} "
                  f"tokens, activation checkpointing; tokens/s (median of steps after {args.warmup}).", "",
                  "| pair | " + " | ".join([names.get(s, s) for s in sides] + [f"{a} / {b}" for a, b in ratios]) + " |",
                  "|---|" + "---|" * (len(sides) + len(ratios))]
        for r in report["train"]:
            t = {k: r[k]["tokens_per_s"] for k in sides}
            lines.append(f"| {r['pair']} | " + " | ".join([f"{t[s]:.1f}" for s in sides]
                                                       + [f"{t[a] / t[b]:.2f}" for a, b in ratios]) + " |")
        if "breakdown" in report:
            bd = report["breakdown"]
            lines += ["", f"Where a step goes (`auto`, {bd['dtype']}, {bd['tokens_per_step']:.0f} tokens a step, "
                      f"{bd['step_s']:.2f} s a step; seconds per step):", ""]
            lines += [f"- {name}: {value:.2f}" for name, value in bd["parts_s"].items()]
            lines += [f"- the decoder's matmuls at this CPU's measured rate ({bd['matmul_flops'] / 1e9:.0f} GFLOPS, "
                      f"a 2048 x 640 x 8192 product): {bd['decoder_matmul_s']:.2f}"]
        twin = "fp32" if args.before_dtype == "float32" else "auto"  # the side `before` runs like
        if {"before", twin} <= set(sides):
            same = all(r["before"]["losses"] == r[twin]["losses"] for r in report["train"])
            lines += ["", f"Losses, before vs {twin}: {'identical' if same else 'differ'}."]
        lines += ["", "Losses (pair 0): " + "; ".join(f"{s} {report['train'][0][s]['losses']}" for s in sides) + ".", ""]
    if report["eval"]:
        sides = [k for k in report["eval"][0] if k != "pair"]
        lines += [f"Evaluation: BoolQ zero-shot, {args.eval_rows} rows, batch 8; examples/s (scoring only) and "
                  "accuracy.", "", "| pair | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
        for r in report["eval"]:
            lines.append(f"| {r['pair']} | " + " | ".join(
                f"{r[s]['examples_per_s']:.2f} ({100 * statistics.mean(r[s]['correct']):.1f} %)" for s in sides) + " |")
        first = report["eval"][0]
        if "lm-eval fp32" in first:
            agree = sum(a == b for a, b in zip(first["fp32"]["correct"], first["lm-eval fp32"]["correct"]))
            lines += ["", f"fp32, per row: ours and lm-eval agree on {agree} of {len(first['fp32']['correct'])} rows."]
    if report["memory"]:
        m = report["memory"]
        lines += ["", "Held-out loss (2 batches), peak resident set above the loaded model: "
                  f"before {m['before']['above_loaded_bytes'] / 2**20:.0f} MiB, after "
                  f"{m['after']['above_loaded_bytes'] / 2**20:.0f} MiB (loss {m['before']['loss']:.4f} / "
                  f"{m['after']['loss']:.4f})."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
