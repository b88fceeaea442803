"""Rows into scorer requests: few-shot context, choices, gold answer (lm-evaluation-harness layout).

Few-shot context = the examples joined by the few-shot delimiter, the delimiter again, then the
row's prompt. An example is its prompt + target delimiter + its gold answer. Examples are drawn by
one `random.Random(seed)` in row order, as lm-evaluation-harness' default sampler does (seed 1234).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lowmem_tune.errors import UserError
from lowmem_tune.evaluation.cards import DocFormatter, TaskCard

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
    """Draws few-shot examples for rows in order from one seeded generator.

    When the pool is the evaluated split itself (`pool_is_eval_split`; the evaluated rows are then
    its first rows), n+1 are drawn and the row itself is dropped, so it never answers its own
    question — lm-evaluation-harness' rule.
    """

    def __init__(self, pool: list[dict[str, Any]], pool_is_eval_split: bool, seed: int = FEWSHOT_SEED):
        self._pool = pool
        self._pool_is_eval_split = pool_is_eval_split
        self._rng = random.Random(seed)

    def examples(self, row_index: int, n: int) -> list[dict[str, Any]]:
        if n <= 0:
            return []
        draw = min(n + 1 if self._pool_is_eval_split else n, len(self._pool))
        picked = self._rng.sample(range(len(self._pool)), draw)
        if self._pool_is_eval_split:
            picked = [i for i in picked if i != row_index]
        return [self._pool[i] for i in picked[:n]]


class QuestionBuilder:
    """Turns a card's rows into ChoiceQuestion / OpenQuestion requests."""

    def __init__(self, card: TaskCard):
        self.card = card
        self.fmt = DocFormatter(card)

    def _gold_index(self, row: dict[str, Any], n_choices: int) -> int:
        index = self.fmt.gold_index(row)
        if not 0 <= index < n_choices:
            raise UserError(f"task {self.card.name}: gold index {index} is outside the {n_choices} choices of a row")
        return index

    def _example(self, row: dict[str, Any]) -> str:
        """A solved example for the few-shot context."""
        card = self.card
        if card.scorer == "generation":
            return self.fmt.text(row) + card.target_delimiter + self.fmt.gold_text(row)
        choices = self.fmt.choices(row)
        gold = self._gold_index(row, len(choices))
        if card.choices_complete_context:
            return choices[gold] + card.target_delimiter + self.fmt.continuation(row)
        return self.fmt.text(row) + card.target_delimiter + choices[gold]

    def _prefix(self, examples: list[dict[str, Any]]) -> str:
        if not examples:
            return ""
        delim = self.card.fewshot_delimiter
        return delim.join(self._example(row) for row in examples) + delim

    def choice_question(self, row: dict[str, Any], examples: list[dict[str, Any]]) -> ChoiceQuestion:
        card = self.card
        prefix = self._prefix(examples)
        choices = self.fmt.choices(row)
        gold = self._gold_index(row, len(choices))
        if card.choices_complete_context:
            continuation = card.target_delimiter + self.fmt.continuation(row)
            return ChoiceQuestion([prefix + c for c in choices], [continuation] * len(choices), choices, gold)
        context = prefix + self.fmt.text(row)
        return ChoiceQuestion([context] * len(choices), [card.target_delimiter + c for c in choices], choices, gold)

    def open_question(self, row: dict[str, Any], examples: list[dict[str, Any]]) -> OpenQuestion:
        return OpenQuestion(self._prefix(examples) + self.fmt.text(row), self.fmt.gold_text(row))

    def build(self, rows: list[dict[str, Any]], sampler: FewshotSampler, num_fewshot: int):
        make = self.open_question if self.card.scorer == "generation" else self.choice_question
        return [make(row, sampler.examples(i, num_fewshot)) for i, row in enumerate(rows)]
