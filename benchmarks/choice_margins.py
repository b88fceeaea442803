"""Why finetuning moves SST-2 and not the commonsense mix: what training does to the score of the
gold answer and to the scores of the answers it competes with.

Accuracy on a multiple-choice task is decided by the margin between the gold choice's
log-likelihood and the best other choice's. Training on the gold continuation (the real-task
benchmark's protocol, `real_task.py`) raises the log-likelihood of the gold answers; whether
accuracy moves depends on whether it raises them more than the distractors'. This script scores
every choice of every held-out question with the base model, finetunes it (full finetuning, the
profile `plan` writes, the learning rate and steps of the real-task table, seed 0), scores again,
and reports per task: accuracy before and after, the mean change of the gold answer's
log-likelihood, the mean change of the other answers', and the mean margin (gold minus the best
other) before and after, with how many questions' margin grew.

    python benchmarks/choice_margins.py                    # sst2 and mix, the CPU size (~40 min on 2 cores)
    python benchmarks/choice_margins.py --experiments mix
    python benchmarks/choice_margins.py --render           # the table again from the JSON

Results: benchmarks/results/choice_margins.{json,md}.
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
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
STRATEGY, LR = "full", 1e-5  # full finetuning at the rate the dev part chose for it on both experiments


def choice_loglikelihoods(model, tokenizer, task: str, data_file: str) -> list[dict[str, Any]]:
    """Every held-out question's gold index and the log-likelihood of each of its choices, scored
    as `eval` scores them (zero-shot, the task card's prompt, BOS first)."""
    from lowmem_tune.evaluation.cards import load_card
    from lowmem_tune.evaluation.runner import run_task

    was_training = model.training
    model.eval()
    try:
        scores, _ = run_task(model, tokenizer, load_card(task), num_fewshot=0, batch_size=16, data_file=data_file)
    finally:
        model.train(was_training)
    return [{"gold": gold, "lls": lls} for gold, lls in zip(scores.golds, scores.choice_loglikelihoods)]


def margin(question: dict[str, Any]) -> float:
    lls, gold = question["lls"], question["gold"]
    return lls[gold] - max(ll for i, ll in enumerate(lls) if i != gold)


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """What training changed on one task's held-out questions (log-likelihoods in nats)."""
    gold = [a["lls"][a["gold"]] - b["lls"][b["gold"]] for b, a in zip(before, after)]
    others = [statistics.mean(la - lb for i, (lb, la) in enumerate(zip(b["lls"], a["lls"])) if i != b["gold"])
              for b, a in zip(before, after)]
    return {
        "n": len(before),
        "acc_before": statistics.mean(margin(q) > 0 for q in before),
        "acc_after": statistics.mean(margin(q) > 0 for q in after),
        "gold_change": statistics.mean(gold),
        "others_change": statistics.mean(others),
        "margin_before": statistics.mean(margin(q) for q in before),
        "margin_after": statistics.mean(margin(q) for q in after),
        "margin_grew": sum(margin(a) > margin(b) for b, a in zip(before, after)),
    }


def run_experiment(experiment: str, size_name: str, work: Path, model_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    import real_task
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import load_model, resolve_dtype
    from lowmem_tune.profile import profile_from_dict
    from lowmem_tune.train import RunControl
    from lowmem_tune.train.run import TrainingRun

    size = real_task.SIZES[size_name]
    data = real_task.prepare(experiment, size, work)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = torch.device("cpu")
    base = load_model(resolve_model(str(model_dir)), "pretrained", resolve_dtype("auto", device), device)
    before = {t: choice_loglikelihoods(base, tokenizer, t, data["heldout"][t]) for t in data["tasks"]}
    del base

    class Quiet:
        def emit(self, event: Any) -> None:
            pass

    args = argparse.Namespace(model=model_dir, dtype="auto", device="cpu", size=size_name, experiment=experiment,
                              steps=None, lr=LR, seed=0, work=work)
    raw = real_task.run_profile(args, real_task.planned_profile(STRATEGY, size["max_seq_len"], ROOT), data)
    run = TrainingRun(profile_from_dict(raw, source=f"choice_margins {experiment}"), False, Quiet(), RunControl())
    try:
        run.setup()
        run.train()
        after = {t: choice_loglikelihoods(run.model, tokenizer, t, data["heldout"][t]) for t in data["tasks"]}
        dtype = str(run.dtype).removeprefix("torch.")
    finally:
        run.cleanup()
    return {"tasks": {t: compare(before[t], after[t]) for t in data["tasks"]}, "steps": raw["train"]["max_steps"],
            "micro_batch": raw["train"]["micro_batch_size"], "dtype": dtype,
            "train_examples": sum(c["train"] for c in data["counts"].values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", choices=["sst2", "mix"], default=["sst2", "mix"])
    parser.add_argument("--size", choices=["cpu", "smoke"], default="cpu",
                        help="real_task.py's sizes (smoke: checks the script, writes nothing)")
    parser.add_argument("--render", action="store_true", help="write the table again from results/choice_margins.json")
    args = parser.parse_args()
    if args.render:
        write_table(json.loads((RESULTS / "choice_margins.json").read_text()))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_assets import gemma_model

    began = time.perf_counter()
    # the code that runs is the checkout's as this starts (its modules load now)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    model_dir = gemma_model()
    report: dict[str, Any] = {"experiments": {}}
    for experiment in args.experiments:
        with tempfile.TemporaryDirectory() as tmp:
            report["experiments"][experiment] = run_experiment(experiment, args.size, Path(tmp), model_dir)
        print(experiment, json.dumps(report["experiments"][experiment]["tasks"]), flush=True)
    report["wall_s"] = time.perf_counter() - began
    report["meta"] = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "command": " ".join(["python", "benchmarks/choice_margins.py", *sys.argv[1:]])}
    if args.size != "cpu":
        print(json.dumps(report, indent=1))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "choice_margins.json").write_text(json.dumps(report, indent=1) + "\n")
    write_table(report)


def write_table(report: dict[str, Any]) -> None:
    meta = report["meta"]
    lines = [f"Gemma 3 270M (dequantized Q4_K_M): what {STRATEGY} finetuning (lr {LR:g}, seed 0) does to each "
             f"choice's log-likelihood on the held-out parts — {meta['date']}, commit {meta['commit']}, "
             f"{meta['machine']} (`{meta['command']}`, {report['wall_s'] / 60:.0f} min).", "",
             "Changes in nats, means over questions; margin = gold minus the best other choice (accuracy is the "
             "share of questions with a positive margin).", "",
             "| experiment | task | n | acc before | acc after | gold answer's change | other answers' change | "
             "margin before | margin after | margins that grew |", "|---" * 10 + "|"]
    for experiment, result in report["experiments"].items():
        for task, r in result["tasks"].items():
            lines.append(f"| {experiment} | {task} | {r['n']} | {100 * r['acc_before']:.1f} | "
                         f"{100 * r['acc_after']:.1f} | "
                         f"{r['gold_change']:+.2f} | {r['others_change']:+.2f} | {r['margin_before']:+.2f} | "
                         f"{r['margin_after']:+.2f} | {r['margin_grew']} of {r['n']} |")
    lines.append("")
    lines += [f"- {experiment}: {result['steps']} steps x {result['micro_batch']} of {result['train_examples']} train "
              f"examples, weights in {result['dtype']}." for experiment, result in report["experiments"].items()]
    (RESULTS / "choice_margins.md").write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
