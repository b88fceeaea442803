"""What fits my card: for every catalog model x card preset x sequence length, the plan `lowmem-tune
plan` chooses (strategy and settings) and its estimate; for an 8, a 12, a 16 and a 24 GB card also
the peak `--verify` measures on fake tensors (each in its own process).

    python benchmarks/reach.py                       # the whole grid, verifying the 8/12/16/24 GB columns
    python benchmarks/reach.py --no-verify           # estimates only (seconds)
    python benchmarks/reach.py --seq-lens 512 --verify-models llama-2-7b llama-2-13b
    python benchmarks/reach.py --models llama-2-7b --seq-lens 512

Results: benchmarks/results/reach.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not

MODELS = ["llama-2-7b", "llama-2-13b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "llama-3.2-3b", "llama-3.2-1b",
          "qwen2.5-1.5b", "qwen2.5-0.5b", "tinyllama-1.1b"]
CARDS = ["rtx4060", "rtx3060", "rtx4060ti-16gb", "rtx4080", "rtx3090", "rtx4090", "a100-40gb"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
VERIFIED = ("rtx4060", "rtx3060", "rtx4060ti-16gb", "rtx4090")  # 8, 12, 16 and 24 GB (rtx4080 / 3090 plan alike)
ALTERNATIVES = {"apollo": "A", "apollo-mini": "Am", "lora": "L", "dora": "D", "qlora": "Q"}
"""The second table's methods (where the plan has them), by their short cell names."""


def plan(model: str, card: str, seq_len: int) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "lowmem_tune", "plan", "--model", model, "--gpu", card,
                             "--seq-len", str(seq_len), "--json"], capture_output=True, text=True, cwd=ROOT,
                            env=ENV)
    if result.returncode != 0:
        raise RuntimeError(f"plan {model} {card} {seq_len}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def verify(model: str, card: str, seq_len: int) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "lowmem_tune", "plan", "--model", model, "--gpu", card,
                             "--seq-len", str(seq_len), "--json", "--verify"], capture_output=True, text=True,
                            cwd=ROOT, env=ENV)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout)["verify"]


def _plan_key(row: dict[str, Any]) -> str:
    chosen = row["chosen"]
    return json.dumps([row["model"], row["seq_len"], chosen and chosen["strategy"], chosen and chosen["settings"]],
                      sort_keys=True)


def label(chosen: dict[str, Any] | None) -> str:
    """A short cell: strategy, rank or sampled layers, and what the plan gave up."""
    if chosen is None:
        return "—"
    s, name = chosen["settings"], chosen["strategy"]
    parts = [name]
    if name in ("galore", "fira"):
        parts.append(f"r{s['rank']}")
    elif name in ("lisa", "owlore"):
        parts.append(f"γ{s['sampled_layers']}")
    elif name == "welore":
        parts.append(f"ERR {s['rank_reduction']:g}")
    if s.get("weight_bits") == 8:
        parts.append("INT8")
    if s.get("train_embeddings") is False:
        parts.append("frozen emb")
    elif s.get("embedding_rank") is not None:
        parts.append("GaLore emb")
    parts.append(f"mb{s['micro_batch_size']}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--cards", nargs="+", default=CARDS)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--verify-models", nargs="+", default=MODELS, metavar="MODEL",
                        help="verify only these models' rows (a 7B verify takes minutes on a small CPU)")
    parser.add_argument("--reuse-verify", type=Path, metavar="REACH_JSON",
                        help="take the measured peak from an earlier reach.json where a row's plan (model, "
                             "settings, sequence length) is the same: the fake-tensor peak depends on nothing else")
    args = parser.parse_args()
    earlier = {} if args.reuse_verify is None else {
        _plan_key(r): r["verify"] for r in json.loads(args.reuse_verify.read_text())["rows"]
        if "peak_bytes" in r.get("verify", {})}

    rows = []
    for seq_len in args.seq_lens:
        for model in args.models:
            for card in args.cards:
                report = plan(model, card, seq_len)
                chosen = report["chosen"]
                row = {"model": model, "card": card, "seq_len": seq_len, "usable_bytes": report["gpu"]["usable_bytes"],
                       "chosen": None if chosen is None else {k: chosen[k] for k in ("strategy", "settings", "memory")},
                       "label": label(chosen), "nearest_fixes": report.get("nearest_fixes"),
                       "alternatives": {c["strategy"]: {"fits": c["fits"], "total_bytes": c["memory"]["total"]}
                                        for c in report["candidates"] if c["strategy"] in ALTERNATIVES}}
                if chosen is not None and card in VERIFIED and model in args.verify_models and not args.no_verify:
                    reused = earlier.get(_plan_key(row))
                    row["verify"] = verify(model, card, seq_len) if reused is None else {
                        **reused, "analytic_bytes": chosen["memory"]["total"], "reused": True,
                        "relative_error": round(chosen["memory"]["total"] / reused["peak_bytes"] - 1, 4)}
                print(json.dumps({k: row[k] for k in ("model", "card", "seq_len", "label")}
                                 | ({"relative_error": row["verify"].get("relative_error")} if "verify" in row else {})),
                      flush=True)
                rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(),
            "command": " ".join(["python", "benchmarks/reach.py", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reach.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"What `lowmem-tune plan` chooses per model and card (bf16 compute, 10% margin) — {meta['date']}, "
             f"commit {meta['commit']} (`{meta['command']}`). A cell: strategy, GaLore rank (r) or sampled layers "
             "(γ), what was given up (INT8 weights, embeddings through GaLore or frozen), micro batch; — : nothing "
             "fits. Verified: the analytic peak against the fake-tensor `--verify` peak."]
    lines += _grid(rows, args, _chosen_cell)
    lines += _alternatives_table(rows, args)
    (RESULTS / "reach.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _alternatives_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Per model and card: each of ALTERNATIVES that fits, with its estimate (GiB)."""
    named = [name for name in ALTERNATIVES if any(name in r["alternatives"] for r in rows)]
    lines = ["", "Beside the chosen plan: " + ", ".join(f"{ALTERNATIVES[n]} = {n}" for n in named)
             + " — each that fits, with its estimate in GiB at the settings `plan --strategy` would pick (— : none fits)."]

    def cell(row: dict[str, Any]) -> str:
        fits = [f"{ALTERNATIVES[n]} {row['alternatives'][n]['total_bytes'] / 2**30:.1f}" for n in named
                if row["alternatives"].get(n, {}).get("fits")]
        return " · ".join(fits) or "—"

    return lines + _grid(rows, args, cell)


def _grid(rows: list[dict[str, Any]], args: argparse.Namespace, cell: Callable[[dict[str, Any]], str]) -> list[str]:
    """A markdown table per sequence length: a line per model, a column per card, `cell(row)` in each."""
    lines = []
    for seq_len in args.seq_lens:
        lines += ["", f"**seq {seq_len}**", "", "| model | " + " | ".join(args.cards) + " |",
                  "|---|" + "---|" * len(args.cards)]
        for model in args.models:
            cells = [cell(next(r for r in rows if (r["model"], r["card"], r["seq_len"]) == (model, card, seq_len)))
                     for card in args.cards]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def _chosen_cell(row: dict[str, Any]) -> str:
    """The chosen plan's label, its estimate and, where measured, the estimate's error against --verify."""
    if "verify" in row and "relative_error" in row["verify"]:
        return (f"{row['label']} ({row['chosen']['memory']['total'] / 2**30:.1f} GiB, "
                f"verify {row['verify']['relative_error']:+.1%})")
    if row["chosen"] is not None:
        return f"{row['label']} ({row['chosen']['memory']['total'] / 2**30:.1f} GiB)"
    return row["label"]


if __name__ == "__main__":
    main()
