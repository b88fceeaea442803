"""Evaluate a loaded model on tasks: the Python API the CLI and the training loop call.

RESULTS = {"tasks": {TASK: {"acc", "acc_stderr", "n", ...}},
           "groups": {SUITE: {"tasks", "n", "acc_weighted", "acc_macro", ...}}, "protocol": {...}}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lowmem_tune.data.tokenize import bos_first
from lowmem_tune.errors import UserError
from lowmem_tune.evaluation.cards import TaskCard, expand_tasks, load_card, suite_groups
from lowmem_tune.evaluation.chat import ChatRenderer
from lowmem_tune.evaluation.data import load_fewshot_rows, load_task_rows, resolve_data_files
from lowmem_tune.evaluation.generation import GreedyGenerator, answer_is_correct, extract_answer
from lowmem_tune.evaluation.loglikelihood import LoglikelihoodScorer, encode_pairs, model_max_length
from lowmem_tune.evaluation.prompts import FEWSHOT_SEED, ChoiceQuestion, FewshotSampler, OpenQuestion, QuestionBuilder

Progress = Callable[[str, int, int], None]

PROTOCOLS = {
    "loglikelihood": (
        "lm-evaluation-harness 0.4 multiple choice: score = sum of log p(choice tokens | context); "
        "acc = argmax score, acc_norm = argmax score / len(choice in characters); the context's trailing "
        "space moves to the continuation; BOS first as the tokenizer puts it (or as add_bos says), as in "
        "training; cut from the left at the model's context length"
    ),
    "generation": (
        "greedy decoding until a stop string; the answer is the card's pattern matched as whole words; "
        "an unparseable output counts as wrong and stays in the denominator"
    ),
}
GROUPS = (
    "a suite's METRIC_weighted is the mean over all its rows (each task weighted by its n): "
    "lm-evaluation-harness' group score (weight_by_size, as in its mmlu groups), with its pooled "
    "standard error; METRIC_macro is the plain mean of the tasks' scores, standard error "
    "sqrt(sum of the tasks' squared errors) / tasks"
)
CHAT = (
    "the context rendered with the tokenizer's chat template, generation prompt added (the preamble as "
    "a system message; few-shot examples as user / assistant turns, or with fewshot_as_multiturn false "
    "joined with the question into one user turn); a choice follows it without the target delimiter, "
    "as in lm-evaluation-harness 0.4.13's --apply_chat_template"
)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports it.

    The standard error needs two values; with fewer it is None.
    """
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def group_scores(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A suite's scores from its tasks' summaries: per metric every task reports, the mean weighted
    by the tasks' n with lm-eval's pooled standard error, and the plain (macro) mean."""
    sizes = [s["n"] for s in summaries]
    out: dict[str, Any] = {"n": sum(sizes)}
    for metric in ("acc", "acc_norm"):
        if not all(metric in s for s in summaries):
            continue
        values = [s[metric] for s in summaries]
        errors = [s.get(f"{metric}_stderr") for s in summaries]
        known = None not in errors
        out[f"{metric}_weighted"] = sum(v * n for v, n in zip(values, sizes)) / sum(sizes)
        pooled = None
        if known and sum(sizes) > len(sizes):  # lm-eval's pooled_sample_stderr
            variance = sum((n - 1) * e ** 2 * n for n, e in zip(sizes, errors)) / (sum(sizes) - len(sizes))
            pooled = math.sqrt(variance / sum(sizes))
        out[f"{metric}_weighted_stderr"] = pooled
        out[f"{metric}_macro"] = sum(values) / len(values)
        out[f"{metric}_macro_stderr"] = math.sqrt(sum(e ** 2 for e in errors)) / len(errors) if known else None
    return out


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


@dataclass
class TaskScores:
    """Per-row outcomes of one task: 0/1 per metric, and what the model chose or answered.

    Choice tasks also keep each row's gold index and the log-likelihood of every choice (what
    lm-eval's --log_samples writes): the margins behind the accuracy.
    """

    task: str
    per_row: dict[str, list[float]]
    predictions: list[Any]
    counts: dict[str, int] = field(default_factory=dict)
    golds: list[int] = field(default_factory=list)
    choice_loglikelihoods: list[list[float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for metric, values in self.per_row.items():
            out[metric], out[f"{metric}_stderr"] = mean_and_stderr(values)
        out["n"] = len(self.predictions)
        out.update(self.counts)
        return out


def score_choice_questions(questions: Sequence[ChoiceQuestion], scorer: LoglikelihoodScorer, metrics: Sequence[str],
                           bos: bool, task: str = "", progress: Progress | None = None) -> TaskScores:
    pairs = [(ctx, cont) for q in questions for ctx, cont in zip(q.contexts, q.continuations)]
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(task, done, len(pairs))

    scores = iter(scorer.score(encode_pairs(scorer.tokenizer, pairs, bos), advance))
    per_row: dict[str, list[float]] = {m: [] for m in metrics}
    predictions = []
    choice_lls = []
    for q in questions:
        lls = [next(scores) for _ in q.choices]
        choice_lls.append(lls)
        pred = argmax(lls)
        predictions.append(pred)
        if "acc" in per_row:
            per_row["acc"].append(float(pred == q.gold))
        if "acc_norm" in per_row:
            # An empty choice would divide by zero; lm-eval never ships one.
            norm = [ll / (len(c) or 1) for ll, c in zip(lls, q.choices)]
            per_row["acc_norm"].append(float(argmax(norm) == q.gold))
    return TaskScores(task, per_row, predictions, golds=[q.gold for q in questions], choice_loglikelihoods=choice_lls)


def score_open_questions(questions: Sequence[OpenQuestion], generator: GreedyGenerator, card: TaskCard,
                         progress: Progress | None = None) -> TaskScores:
    assert card.answer is not None
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(card.name, done, len(questions))

    outputs = generator.generate([q.context for q in questions], card.max_new_tokens, card.stop, advance)
    answers = [extract_answer(text, card.answer) for text in outputs]
    correct = [float(answer_is_correct(a, q.gold, card.answer.compare)) for a, q in zip(answers, questions)]
    unparsed = sum(a is None for a in answers)
    return TaskScores(card.name, {"acc": correct}, answers, {"unparsed": unparsed})


def run_task(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, card: TaskCard, *,
             limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
             data_file: str | None = None, add_bos: bool | None = None, chat: ChatRenderer | None = None,
             progress: Progress | None = None) -> tuple[TaskScores, dict[str, Any]]:
    """Scores of one task and the protocol that produced them; `add_bos` as in `data.tokenize.bos_first`;
    contexts rendered by `chat` (the tokenizer's chat template) when given."""
    bos = bos_first(tokenizer, add_bos)
    split_rows, data_desc = load_task_rows(card, data_file)
    rows = split_rows[:limit] if limit is not None else split_rows
    if not rows:
        raise UserError(f"task {card.name}: no rows to evaluate in {data_desc}")
    shots = card.num_fewshot if num_fewshot is None else num_fewshot
    pool, pool_desc = load_fewshot_rows(card, data_file) if shots > 0 else (None, "none")
    first_n = card.fewshot_sampler == "first_n"
    available = len(pool) if pool is not None else len(split_rows) - 1  # a row is never its own example
    if first_n and shots > available:
        raise UserError(f"task {card.name}: {shots} few-shot examples asked, but its few-shot rows "
                        f"({pool_desc}) hold fewer; ask for fewer with --num-fewshot")
    sampler = FewshotSampler(split_rows if pool is None else pool, pool_is_eval_split=pool is None, first_n=first_n)
    dropped_before = chat.system_dropped if chat is not None else 0
    questions = QuestionBuilder(card, chat).build(rows, sampler, shots)
    if card.scorer == "generation":
        scores = score_open_questions(questions, GreedyGenerator(model, tokenizer, bos, batch_size), card, progress)
    else:
        scorer = LoglikelihoodScorer(model, tokenizer, batch_size)
        scores = score_choice_questions(questions, scorer, card.metrics, bos, card.name, progress)
    protocol = {
        "scorer": card.scorer,
        "metrics": list(scores.per_row),
        "num_fewshot": shots,
        "bos": bos,
        "fewshot_seed": FEWSHOT_SEED,
        "fewshot_sampler": card.fewshot_sampler,
        "fewshot_source": pool_desc,
        "chat_template": chat is not None,
        "data": data_desc,
        "card": card.path.name if card.path else card.name,
    }
    if card.subject is not None:
        protocol["subject"] = card.subject
    if chat is not None:
        protocol["fewshot_as_multiturn"] = chat.multiturn
        protocol["system_message_dropped"] = chat.system_dropped - dropped_before  # contexts the template refused it in
    return scores, protocol


def check_tasks(tasks: list[str], data_files: dict[str, str], key: str = "--data-file") -> list[str]:
    """The task names (suites expanded), once their cards load and the local data named for them
    exists: what a run checks before its model loads, so a typo fails in the first second."""
    names = expand_tasks(tasks)
    for name in names:
        load_card(name)
    resolve_data_files(data_files, names, key)
    return names


def chat_renderer(tokenizer: PreTrainedTokenizerBase, apply_chat_template: bool, fewshot_as_multiturn: bool | None,
                  key: str = "--apply-chat-template") -> ChatRenderer | None:
    """The renderer for `apply_chat_template` (few-shot as multi-turn unless told otherwise, as
    lm-eval 0.4.13 defaults), or None; a tokenizer without a chat template is a one-line error."""
    if not apply_chat_template:
        if fewshot_as_multiturn:
            multiturn_key = "--fewshot-as-multiturn" if key.startswith("--") else "eval.fewshot_as_multiturn"
            raise UserError(f"{multiturn_key} needs {key}: few-shot turns are turns of a chat template")
        return None
    return ChatRenderer(tokenizer, fewshot_as_multiturn is not False, key)


def evaluate_tasks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list[str], *,
                   limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                   data_files: dict[str, str] | None = None, add_bos: bool | None = None,
                   apply_chat_template: bool = False, fewshot_as_multiturn: bool | None = None,
                   chat_key: str = "--apply-chat-template", progress: Progress | None = None) -> dict:
    """Evaluate `model` (already on its device, in its dtype) on tasks and suites; RESULTS dict.

    `add_bos`: None puts BOS first where the tokenizer does on its own (lm-evaluation-harness'
    default, and what training does); True / False override it (the harness's `add_bos_token`).
    `apply_chat_template`: contexts rendered with the tokenizer's chat template (`chat_key` names
    the setting in errors); `fewshot_as_multiturn` (default True with it) as in the harness.

    The model is put in eval mode for the duration and given back in the mode it came in.
    """
    names = check_tasks(tasks, data_files or {})
    files = resolve_data_files(dict(data_files or {}), names)
    chat = chat_renderer(tokenizer, apply_chat_template, fewshot_as_multiturn, chat_key)
    cards = [load_card(name) for name in names]
    param = next(model.parameters())
    results: dict[str, Any] = {"tasks": {}, "groups": {}, "protocol": {
        "scorers": {c.scorer: PROTOCOLS[c.scorer] for c in cards},
        "batch_size": batch_size,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "device": str(param.device),
        "dtype": str(param.dtype).removeprefix("torch."),
        "max_length": model_max_length(model, tokenizer),
        "add_bos": add_bos,
        "apply_chat_template": chat is not None,
        "fewshot_as_multiturn": chat.multiturn if chat is not None else None,
        "chat_template_sha256": chat.sha256 if chat is not None else None,
        "tasks": {},
    }}
    if chat is not None:
        results["protocol"]["chat"] = CHAT
    was_training = model.training
    model.eval()
    try:
        for card in cards:
            scores, protocol = run_task(model, tokenizer, card, limit=limit, num_fewshot=num_fewshot,
                                        batch_size=batch_size, data_file=files.get(card.name),
                                        add_bos=add_bos, chat=chat, progress=progress)
            results["tasks"][card.name] = scores.summary()
            results["protocol"]["tasks"][card.name] = protocol
    finally:
        model.train(was_training)
    for group, members in suite_groups(tasks).items():
        results["groups"][group] = {"tasks": members, **group_scores([results["tasks"][t] for t in members])}
    if results["groups"]:
        results["protocol"]["groups"] = GROUPS
    return results
