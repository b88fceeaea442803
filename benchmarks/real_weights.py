"""OwLore's and WeLore's premises on trained weights: Gemma 3 270M (dequantized Q4_K_M,
`real_assets.py`) instead of random ones.

- OwLore: per-layer outlier ratios D_l (M = 13, the product's default) on real calibration text —
  BoolQ passages from the train side of the split `real_task.py` makes, 32 sequences of 256
  tokens — and the sampling probabilities OwLore draws layers with.
- WeLore: compressed at ERR 0.1, 0.3 and 0.5 (min_ratio 0.5): which matrix types become low-rank
  components and at which ranks, and perplexity before and after compression on held-out real
  text (BoolQ passages of the held-out part, 64 sequences of 256 tokens, BOS first as training
  does).

    python benchmarks/real_weights.py

Results: benchmarks/results/real_weights.{json,md,png}.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN, CALIBRATION_SEQUENCES, PERPLEXITY_SEQUENCES = 256, 32, 64
ERRS = (0.1, 0.3, 0.5)  # 0.3 and 0.5: the paper's; 0.1: what a 270M model keeps working at


def passages() -> tuple[list[str], list[str]]:
    """BoolQ passages: (calibration side, held-out side), the split real_task.py makes."""
    import datasets

    from real_assets import task_data
    from real_task import split_rows

    rows = [dict(r) for r in datasets.load_from_disk(str(task_data("boolq")))]
    parts = split_rows(rows, 100, 25, None)
    return [r["passage"] for r in parts["train"]], [r["passage"] for r in parts["heldout"]]


def token_rows(tokenizer, texts: list[str], count: int) -> torch.Tensor:
    """`count` rows of SEQ_LEN tokens: each text BOS first (as training encodes it), concatenated."""
    import torch

    from lowmem_tune.data.tokenize import bos_first, encode

    stream = [t for ids in encode(tokenizer, texts, bos_first(tokenizer)) for t in ids]
    rows = [stream[i:i + SEQ_LEN] for i in range(0, len(stream) - SEQ_LEN + 1, SEQ_LEN)][:count]
    return torch.tensor(rows)


def perplexity(model, rows) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in rows.split(8):
            logits = model(batch).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="sum")
            total, count = total + float(losses), count + batch[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    import torch

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.compress import compress_model
    from lowmem_tune.modeling import load_model, load_tokenizer
    from lowmem_tune.resources import cache_dir
    from lowmem_tune.strategies.outliers import compute_outlier_ratios, sampling_probabilities
    from real_assets import gemma_model

    began = time.perf_counter()
    folder = gemma_model()
    resolved = resolve_model(str(folder))
    tokenizer = load_tokenizer(str(folder))
    calibration_text, heldout_text = passages()
    calibration = token_rows(tokenizer, calibration_text, CALIBRATION_SEQUENCES)
    heldout = token_rows(tokenizer, heldout_text, PERPLEXITY_SEQUENCES)

    dense = load_model(resolved, "pretrained", torch.float32, torch.device("cpu")).eval()
    ratios, _ = compute_outlier_ratios(dense, list(calibration.split(8)), 13.0, "BoolQ passages (train side)")
    report: dict[str, Any] = {
        "owlore": {"threshold": 13.0, "tokens": calibration.numel(), "ratios": ratios.ratios,
                   "probabilities": sampling_probabilities(ratios)},
        "perplexity": {"dense": perplexity(dense, heldout), "tokens": heldout.numel()},
        "welore": {},
    }
    print("outlier ratios", [round(100 * r, 3) for r in ratios.ratios], flush=True)
    for err in ERRS:
        model = load_model(resolved, "pretrained", torch.float32, torch.device("cpu")).eval()
        plan = compress_model(model, err, 0.5, cache_dir(), progress=False)
        by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for m in plan.matrices:
            by_type[m.name.rsplit(".", 1)[-1]].append({"layer": int(m.name.split(".layers.")[1].split(".")[0]),
                                                       "rank": m.rank, "full": m.full_rank, "lrc": m.lrc})
        report["welore"][str(err)] = {"summary": plan.summary(), "by_type": by_type,
                                      "perplexity": perplexity(model, heldout)}
        print("ERR", err, "perplexity", round(report["welore"][str(err)]["perplexity"], 2), flush=True)
    report["wall_s"] = time.perf_counter() - began
    write_results(report)


def write_results(report: dict[str, Any]) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": "python benchmarks/real_weights.py"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real_weights.json").write_text(json.dumps({"meta": meta, **report}, indent=1) + "\n")
    o = report["owlore"]
    lines = [f"Gemma 3 270M (dequantized Q4_K_M), trained weights — {meta['date']}, commit {meta['commit']}, "
             f"{meta['machine']} (`{meta['command']}`, {report['wall_s']:.0f} s).", "",
             f"OwLore, M = {o['threshold']:g}, {o['tokens']} tokens of BoolQ passages:", "",
             "| layer | outlier ratio | p(sample) |", "|---|---|---|"]
    lines += [f"| {i} | {100 * r:.3f} % | {p:.3f} |" for i, (r, p) in enumerate(zip(o["ratios"], o["probabilities"]))]
    lines += ["", f"Perplexity on {report['perplexity']['tokens']} held-out tokens of BoolQ passages: dense "
              f"{report['perplexity']['dense']:.2f}" + "".join(
                  f"; ERR {err}: {w['perplexity']:.2f}" for err, w in report["welore"].items()) + ".", ""]
    for err, w in report["welore"].items():
        s = w["summary"]
        lines += [f"WeLore at ERR {err} (achieved {s['rank_reduction_achieved']:.3f}, τ {s['tau']:.4f}): "
                  f"{s['lrc']} low-rank components, {s['n_lrc']} dense. Per matrix type, the layers that are "
                  "low-rank and their kept rank / full rank:", ""]
        for kind, rows in w["by_type"].items():
            low = [f"{r['layer']}:{r['rank']}/{r['full']}" for r in rows if r["lrc"]]
            lines.append(f"- {kind}: {len(low)} of {len(rows)} layers low-rank" + (f" ({', '.join(low)})" if low else ""))
        lines.append("")
    (RESULTS / "real_weights.md").write_text("\n".join(lines))
    plot(report, RESULTS / "real_weights.png")
    print("\n".join(lines))


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: picture not drawn (pip install matplotlib)")
        return
    o = report["owlore"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = range(len(o["ratios"]))
    left.bar(layers, [100 * r for r in o["ratios"]], color="tab:blue", label="outlier ratio (%)")
    left.set_xlabel("decoder layer")
    left.set_ylabel("outlier ratio D_l (%)")
    twin = left.twinx()
    twin.plot(layers, o["probabilities"], color="tab:red", marker="o", label="OwLore p(sample)")
    twin.set_ylabel("sampling probability")
    left.set_title("OwLore on Gemma 3 270M (M = 13)")
    kinds = list(report["welore"]["0.5"]["by_type"])
    width = 0.8 / len(report["welore"])
    for offset, (err, w) in enumerate(report["welore"].items()):
        kept = [sum(r["rank"] for r in w["by_type"][k]) / sum(r["full"] for r in w["by_type"][k]) for k in kinds]
        right.bar([i + width * offset for i in range(len(kinds))], kept, width=width, label=f"ERR {err}")
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds, rotation=30)
    right.set_ylabel("kept rank / full rank (all layers)")
    right.set_title("WeLore ranks per matrix type")
    right.set_ylim(0, 1.2)
    right.legend(loc="upper center", ncol=len(report["welore"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
