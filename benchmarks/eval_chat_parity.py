"""`lowmem-tune eval --apply-chat-template` against lm-evaluation-harness 0.4.13 `--apply_chat_template` on
generation tasks, row by row: the rendered prompt, the token ids fed to `generate`, the generation, the score.

A tiny Llama with random weights (seeded; decoder projections x10 and the LM-head rows of " yes", " no",
" A".." E" x8 and of the newline x4, else every row gets the same answer and no score but 0) and a
byte-level BPE trained here, saved with a chat template into one folder both tools load. Rows are written
here in coin_flip's and commonsense_qa's schema. lm-eval gets a `generate_until` yaml, in its own Jinja,
that reproduces our cards' prompt, target, stop string, max_new_tokens and answer pattern (regex filter,
then exact_match); ours runs the CLI in-process with the generator recorded. Both float32 on the CPU;
lm-eval in its own venv (--lm-eval-python).

    python benchmarks/eval_chat_parity.py --lm-eval-python /path/to/venv/bin/python

Results: benchmarks/results/eval_chat_parity.{json,md}.
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
BOS_ID = 1  # <s> in train_local_tokenizer's vocabulary
NOTES = """\
Templates: chatml (writes no BOS) over a tokenizer that adds none, and over one that adds BOS; gemma
(writes the BOS text itself; trims each turn, so the prompt's trailing space goes) over a tokenizer
that adds BOS, where each tool must still put one BOS first. "token ids": what each tool feeds
`generate` (ours: `GreedyGenerator.encode_prompts`; lm-eval: `HFLM.tok_batch_encode`). lm-eval's yaml
sets `test_split` and `fewshot_split` to the same split: only then does 0.4.13 leave the evaluated row
out of its own few-shot examples, as we do for a local file (with `validation_split` it samples it).
The control row runs ours with `--add-bos`, a BOS lm-eval does not put first: it must differ."""
RESULTS = ROOT / "benchmarks" / "results"
BLURB = "Below is a question that describes a task. Write a response that appropriately completes the request."
SHAPES = {"chatml": ("chatml", False), "chatml+bos": ("chatml", True), "gemma+bos": ("gemma", True)}
LAYER_SCALE, BOOST, NEWLINE_BOOST = 10.0, 8.0, 4.0  # see the docstring
MODES = {"0-shot": (0, True, ()), "2-shot multiturn": (2, True, ()), "2-shot single turn": (2, False, ()),
         # a control: a BOS lm-eval does not put first (chatml adds none) must show up as a difference
         "0-shot, ours with --add-bos (control)": (0, True, ("--add-bos",))}
# lm-eval's side of each task, in its own Jinja (regex_replace, not our regex_sub).
LM_EVAL_TASKS = {
    "coin_flip": {
        "doc_to_text": f"{BLURB}\n\n### \nQuestion: {{{{ inputs | regex_replace('^Q: ', '') | trim }}}}\n\n\n"
                       "### Response:\nThe answer is ",
        "doc_to_target": "{{ targets | trim | lower }}", "regex": r"(?i)\b(yes|no)\b"},
    "commonsense_qa": {
        "doc_to_text": f"{BLURB}\n\n### \nQuestion: {{{{ question | trim }}}} Answer Choices:{{% for i in "
                       "range(choices.label | length) %} ({{ choices.label[i] }}) {{ choices.text[i] }}"
                       "{% endfor %}\n\n\n### Response:\nAmong A through E, the answer is ",
        "doc_to_target": "{{ answerKey }}", "regex": r"\b([A-E])\b"},
}


def task_rows() -> dict[str, list[dict[str, Any]]]:
    """Rows written for this benchmark: coin flips enumerated (gold from the parity of the flips)
    and six five-way questions."""
    flips = []
    for a, b, c in [("Mia", "Omar", None), ("Lena", "Kofi", "Ivy"), ("Raj", "Tess", None), ("Uma", "Pavel", "Noor")]:
        for pattern in ((1, 0, 1), (0, 0, 1)) if c else ((1, 1, 0), (0, 1, 0)):
            people = [p for p in (a, b, c) if p]
            text = " ".join(f"{p} {'flips' if f else 'does not flip'} the coin." for p, f in zip(people, pattern))
            flips.append({"inputs": f"Q: A coin is heads up. {text} Is the coin still heads up?",
                          "targets": "yes" if sum(pattern[:len(people)]) % 2 == 0 else "no"})
    questions = [("Where do you put wet dishes to dry?", ["rack", "oven", "bed", "shoe", "mailbox"], "A"),
                 ("What do you wear on your feet in snow?", ["hat", "boots", "scarf", "gloves", "tie"], "B"),
                 ("What tells you the time on a wall?", ["map", "mirror", "clock", "window", "shelf"], "C"),
                 ("Where does a train stop for people?", ["lake", "roof", "forest", "station", "cloud"], "D"),
                 ("What do bees make?", ["milk", "wool", "paper", "glass", "honey"], "E"),
                 ("What do you use to write on a board?", ["chalk", "soap", "spoon", "rope", "leaf"], "A")]
    csqa = [{"id": f"bench-{i}", "question": q, "question_concept": q.split()[-1].rstrip("?"),
             "choices": {"label": list("ABCDE"), "text": t}, "answerKey": k} for i, (q, t, k) in enumerate(questions)]
    return {"coin_flip": flips, "commonsense_qa": csqa}


def build_model(folder: Path, template: str, bos: bool, corpus: list[str], seed: int = 0) -> None:
    """Tiny Llama + local tokenizer + chat template, saved together (as a chat model ships)."""
    import torch
    from test_eval_support import tiny_model, with_bos, with_chat_template
    from transformers import AutoTokenizer

    from lowmem_tune.data.tokenize import adds_bos, train_local_tokenizer

    tok = train_local_tokenizer(corpus, 512)
    tok = with_chat_template(with_bos(tok) if bos else tok, template)
    model = tiny_model(len(tok), seed=seed, max_positions=2048)  # room for every context: nothing is cut
    # " yes", not "yes": answers separated by spaces, so the pattern's word boundaries find them.
    boost = {" yes": BOOST, " no": BOOST, **{" " + c: BOOST for c in "ABCDE"}, "\n": NEWLINE_BOOST}
    with torch.no_grad():
        for layer in model.model.layers:  # larger weights: the next token depends on more than the last one
            for weight in (p for name, p in layer.named_parameters() if name.endswith("proj.weight")):
                weight *= LAYER_SCALE
        for i in range(len(tok)):
            model.lm_head.weight[i] *= boost.get(tok.decode([i]), 1.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert adds_bos(AutoTokenizer.from_pretrained(folder)) == bos, "the saved tokenizer lost its BOS rule"


def ours(folder: Path, files: dict[str, Path], shots: int, multiturn: bool, batch: int,
         extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The CLI in-process; the generator and the scorer recorded per row."""
    import lowmem_tune.evaluation.runner as runner
    from lowmem_tune.cli import main as cli

    seen: dict[str, Any] = {}

    class Recording(runner.GreedyGenerator):
        def generate(self, contexts, max_new_tokens, stop, progress=None):  # type: ignore[override]
            ids = self.encode_prompts(contexts, max_new_tokens)  # what generate feeds the model
            self.last = (list(contexts), ids, super().generate(contexts, max_new_tokens, stop, progress))
            return self.last[2]

    def score(questions, generator, card, progress=None):  # type: ignore[no-untyped-def]
        scores = original(questions, generator, card, progress)
        prompts, ids, outputs = generator.last
        seen[card.name] = {"prompts": prompts, "ids": ids, "outputs": outputs,
                           "scores": [int(s) for s in scores.per_row["acc"]]}
        return scores

    original, original_generator = runner.score_open_questions, runner.GreedyGenerator
    runner.score_open_questions, runner.GreedyGenerator = score, Recording
    try:
        for task, path in files.items():
            out = path.with_suffix(f".ours.{shots}.{multiturn}.json")
            cli.main(["eval", "--dataset", task, "--model", str(folder), "--data-file", str(path), "--dtype",
                      "float32", "--device", "cpu", "--batch-size", str(batch), "--num-fewshot", str(shots),
                      "--apply-chat-template", "--fewshot-as-multiturn" if multiturn else "--no-fewshot-as-multiturn",
                      "--json", str(out), *extra], standalone_mode=False)
            seen[task]["acc"] = json.loads(out.read_text())["tasks"][task]["acc"]
    finally:
        runner.score_open_questions, runner.GreedyGenerator = original, original_generator
    return seen


LM_EVAL_RUNNER = """
import json, sys, pathlib, yaml, torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
runs, cards, batch, work = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
for task, card in cards.items():
    (work / f'{task}.yaml').write_text(yaml.safe_dump(card))
out = []
for run in runs:
    lm = HFLM(pretrained=run['model'], dtype=torch.float32, batch_size=batch, device='cpu')
    result = simple_evaluate(model=lm, tasks=list(cards), task_manager=TaskManager(include_path=str(work)),
                             num_fewshot=run['shots'], apply_chat_template=True, fewshot_as_multiturn=run['multiturn'],
                             log_samples=True, bootstrap_iters=0)
    got = {}
    for task in cards:
        samples = sorted(result['samples'][task], key=lambda s: s['doc_id'])
        prompts = [s['arguments'][0][0] for s in samples]
        # the ids generate_until feeds the model (its tok_batch_encode, nothing cut at this length)
        ids = [lm.tok_batch_encode([p])[0][0].tolist() for p in prompts]
        got[task] = {'prompts': prompts, 'ids': ids, 'outputs': [s['resps'][0][0] for s in samples],
                     'extracted': [s['filtered_resps'][0] for s in samples],
                     'scores': [int(s['exact_match']) for s in samples],
                     'acc': result['results'][task]['exact_match,extract']}
    out.append(got)
print('RESULT ' + json.dumps(out))
"""


def lm_eval(python: str, runs: list[dict[str, Any]], files: dict[str, Path], batch: int, work: Path) -> list[dict]:
    """lm-eval's simple_evaluate on our rows, one run per (model, shots, multiturn)."""
    cards = {}
    for task, spec in LM_EVAL_TASKS.items():
        cards[task] = {
            "task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(files[task])}},
            "test_split": "validation", "fewshot_split": "validation", "output_type": "generate_until",
            "doc_to_text": spec["doc_to_text"], "doc_to_target": spec["doc_to_target"], "target_delimiter": "",
            "fewshot_delimiter": "\n\n", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
            "filter_list": [{"name": "extract", "filter": [{"function": "regex", "regex_pattern": spec["regex"]},
                                                            {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True}],
        }
    (work / "lm_eval_tasks").mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([python, "-c", LM_EVAL_RUNNER, json.dumps(runs), json.dumps(cards), str(batch),
                           str(work / "lm_eval_tasks")], env=env, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lm-eval failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per-row agreement of our run (a) and lm-eval's (b); the first row that differs, if any."""
    n = len(a["prompts"])
    same = {key: sum(x == y for x, y in zip(a[key], b[key])) for key in ("prompts", "ids", "outputs", "scores")}
    first = next((i for i in range(n) if any(a[k][i] != b[k][i] for k in same)), None)
    bos = {f"rows_with_{k}_bos_first": [sum(ids[:k] == [BOS_ID] * k for ids in side["ids"]) for side in (a, b)]
           for k in (1, 2)}
    return {"rows": n, **{f"{key}_identical": v for key, v in same.items()}, "acc_ours": a["acc"],
            "acc_lm_eval": b["acc"], **bos, "prompt_of_row_0": a["prompts"][0],
            "outputs": {"ours": a["outputs"], "lm_eval": b["outputs"]},
            "scores": {"ours": a["scores"], "lm_eval": b["scores"]},
            "first_difference": None if first is None else {k: [a[k][first], b[k][first]] for k in same}}


def markdown(report: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"`lowmem-tune eval --apply-chat-template` vs lm-evaluation-harness 0.4.13 `--apply_chat_template "
             f"[--fewshot_as_multiturn]` on generation tasks (`generate_until`): a tiny random Llama, float32, CPU, "
             f"batch {meta['batch_size']} in both; {meta['date']}, commit {meta['commit']} (`{meta['command']}`).", "",
             "| template | mode | task | rows | prompts identical | token ids identical | generations identical | "
             "scores identical | acc lowmem-tune | acc lm-eval |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, modes in report.items():
        for mode, tasks in modes.items():
            for task, r in tasks.items():
                counts = " | ".join(f"{r[k + '_identical']}/{r['rows']}" for k in ("prompts", "ids", "outputs",
                                                                                      "scores"))
                lines.append(f"| {shape} | {mode} | {task} | {r['rows']} | {counts} | "
                             f"{100 * r['acc_ours']:.1f} % | {100 * r['acc_lm_eval']:.1f} % |")
    return "\n".join(lines + ["", NOTES]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval-python", required=True, help="python of a venv with lm_eval==0.4.13")
    parser.add_argument("--batch-size", type=int, default=4, help="the same for both tools")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the test helpers build the tiny model
    rows = task_rows()
    corpus = [json.dumps(r) for task in rows.values() for r in task] * 4 + [BLURB, "The answer is yes no"] * 20
    corpus += [(ROOT / "lowmem_tune/data/chat_templates" / f"{t}.jinja").read_text() for t in ("chatml", "gemma")] * 4
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = {task: work / f"{task}.jsonl" for task in rows}
        for task, path in files.items():
            path.write_text("".join(json.dumps(r) + "\n" for r in rows[task]))
        runs, keys, mine = [], [], []
        for shape, (template, bos) in SHAPES.items():
            folder = work / shape
            build_model(folder, template, bos, corpus)
            for mode, (shots, multiturn, extra) in MODES.items():
                if extra and shape != "chatml":
                    continue
                runs.append({"model": str(folder), "shots": shots, "multiturn": multiturn})
                keys.append((shape, mode))
                mine.append(ours(folder, files, shots, multiturn, args.batch_size, extra))
        theirs = lm_eval(args.lm_eval_python, runs, files, args.batch_size, work)
    for (shape, mode), a, b in zip(keys, mine, theirs):
        report.setdefault(shape, {})[mode] = {task: compare(a[task], b[task]) for task in rows}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "batch_size": args.batch_size,
            "command": " ".join(["python", "benchmarks/eval_chat_parity.py", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_chat_parity.json").write_text(json.dumps({"meta": meta, "results": report}, indent=1) + "\n")
    (RESULTS / "eval_chat_parity.md").write_text(markdown(report, meta))
    print(markdown(report, meta))


if __name__ == "__main__":
    main()
