"""Rows into scorer requests: few-shot context, choices, gold answer (lm-evaluation-harness layout).

Few-shot context = the card's preamble, the examples joined by the few-shot delimiter, the
delimiter again, then the row's prompt. An example is its prompt + target delimiter + its gold
answer. Examples are drawn by one `random.Random(seed)` in row order, as lm-evaluation-harness'
default sampler does (seed 1234), or are the pool's first rows (`first_n`, MMLU's dev split). With
a chat template (chat.py) the same pieces are turns of a conversation, and a choice follows the
rendered context without the target delimiter, as in the harness.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lowmem_tune.errors import UserError
from lowmem_tune.evaluation.cards import DocFormatter, TaskCard
from lowmem_tune.evaluation.chat import ChatRenderer, Turn, plain_text

FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class ChoiceQuestion:
    """One multiple-choice row: choice i is scored as log p(continuations[i] | contexts[i])."""

    contexts: list[str]
    continuations: list[str]
    choices: list[str]  # the choice texts; acc_norm divides by their length in characters
    gold: int


@dataclass(frozen=True)
class OpenQuestion:
    """One generation row: greedy-decode after `context`, extract, compare with `gold`."""

    context: str
    gold: str


class FewshotSampler:
    """Draws few-shot examples for rows in order from one seeded generator, or takes the pool's
    first rows (`first_n`).

    When the pool is the evaluated split itself (`pool_is_eval_split`; the evaluated rows are then
    its first rows), the row itself is never its own example: n+1 are drawn and the row dropped —
    lm-evaluation-harness' rule — or, with `first_n`, the first n other rows are taken (the harness
    never takes first_n from the evaluated split: MMLU's come from dev).
    """

    def __init__(self, pool: list[dict[str, Any]], pool_is_eval_split: bool, seed: int = FEWSHOT_SEED,
                 first_n: bool = False):
        self._pool = pool
        self._pool_is_eval_split = pool_is_eval_split
        self._rng = random.Random(seed)
        self._first_n = first_n

    def examples(self, row_index: int, n: int) -> list[dict[str, Any]]:
        if n <= 0:
            return []
        if self._first_n:
            picked = [i for i in range(min(n + 1, len(self._pool)))
                      if not (self._pool_is_eval_split and i == row_index)]
        else:
            draw = min(n + 1 if self._pool_is_eval_split else n, len(self._pool))
            picked = self._rng.sample(range(len(self._pool)), draw)
            if self._pool_is_eval_split:
                picked = [i for i in picked if i != row_index]
        return [self._pool[i] for i in picked[:n]]


class QuestionBuilder:
    """Turns a card's rows into ChoiceQuestion / OpenQuestion requests, as plain text or, given a
    `ChatRenderer`, rendered with the tokenizer's chat template."""

    def __init__(self, card: TaskCard, chat: ChatRenderer | None = None):
        self.card = card
        self.fmt = DocFormatter(card)
        self.chat = chat

    def _gold_index(self, row: dict[str, Any], n_choices: int) -> int:
        index = self.fmt.gold_index(row)
        if not 0 <= index < n_choices:
            raise UserError(f"task {self.card.name}: gold index {index} is outside the {n_choices} choices of a row")
        return index

    def _example(self, row: dict[str, Any]) -> list[Turn]:
        """A solved example for the few-shot context: the prompt and its answer."""
        card = self.card
        tgt, few = card.target_delimiter, card.fewshot_delimiter
        if card.scorer == "generation":
            return [Turn("user", self.fmt.text(row), tgt), Turn("assistant", self.fmt.gold_text(row), few)]
        choices = self.fmt.choices(row)
        gold = self._gold_index(row, len(choices))
        if card.choices_complete_context:
            return [Turn("user", choices[gold], tgt), Turn("assistant", self.fmt.continuation(row), few)]
        return [Turn("user", self.fmt.text(row), tgt), Turn("assistant", choices[gold], few)]

    def _context(self, row: dict[str, Any], examples: list[dict[str, Any]], question: str) -> str:
        turns = [Turn("system", self.fmt.preamble(row))] if self.card.preamble else []
        turns = [t for t in turns if t.content]
        for example in examples:
            turns += self._example(example)
        turns.append(Turn("user", question))
        return plain_text(turns) if self.chat is None else self.chat.render(turns)

    @property
    def _target_delimiter(self) -> str:
        return "" if self.chat is not None else self.card.target_delimiter

    def choice_question(self, row: dict[str, Any], examples: list[dict[str, Any]]) -> ChoiceQuestion:
        choices = self.fmt.choices(row)
        gold = self._gold_index(row, len(choices))
        if self.card.choices_complete_context:
            continuation = self._target_delimiter + self.fmt.continuation(row)
            contexts = [self._context(row, examples, c) for c in choices]
            return ChoiceQuestion(contexts, [continuation] * len(choices), choices, gold)
        context = self._context(row, examples, self.fmt.text(row))
        return ChoiceQuestion([context] * len(choices), [self._target_delimiter + c for c in choices], choices, gold)

    def open_question(self, row: dict[str, Any], examples: list[dict[str, Any]]) -> OpenQuestion:
        return OpenQuestion(self._context(row, examples, self.fmt.text(row)), self.fmt.gold_text(row))

    def build(self, rows: list[dict[str, Any]], sampler: FewshotSampler, num_fewshot: int):
        make = self.open_question if self.card.scorer == "generation" else self.choice_question
        return [make(row, sampler.examples(i, num_fewshot)) for i, row in enumerate(rows)]
