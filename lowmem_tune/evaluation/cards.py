"""Task cards: one YAML file per task in evaluate/tasks/, suites in evaluate/suites/.

A card says where the rows come from, how a row becomes a prompt, what the choices or the answer
pattern are and which metrics to report, so a user adds a task by writing YAML. Prompts are Jinja
templates and `choices` / `target` / `continuation` are Jinja expressions over the row's fields, as
in lm-evaluation-harness, so its task definitions translate one to one.
"""

from __future__ import annotations

import difflib

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lowmem_tune.errors import UserError
from lowmem_tune.resources import evaluate_dir

SCORERS = ("loglikelihood", "generation")
LOGLIKELIHOOD_METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class DataSource:
    """Where the rows come from: a hub dataset, or one of our generators (`synthetic`)."""

    split: str
    hub: str | None = None
    config: str | None = None
    fewshot_split: str | None = None
    synthetic: str | None = None
    n: int = 200  # rows drawn from a generator
    fewshot_n: int = 100  # few-shot pool drawn from a generator

    def describe(self) -> str:
        if self.synthetic:
            return f"generated {self.synthetic}:{self.split} (n={self.n})"
        return f"{self.hub}{'/' + self.config if self.config else ''}:{self.split}"


@dataclass(frozen=True)
class AnswerPattern:
    """How a generated answer is read: the first capture group of `pattern`, matched as whole words."""

    pattern: str
    ignore_case: bool = True
    pick: str = "first"  # first or last match in the output
    compare: str = "text"  # text (case-insensitive equality) or number

    def compiled(self) -> re.Pattern[str]:
        return re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)


@dataclass(frozen=True)
class TaskCard:
    name: str
    scorer: str
    source: DataSource
    prompt: str = ""
    choices: str | list[str] | None = None  # expression, or a literal list
    target: str = "label"  # expression: gold index (loglikelihood) or gold answer text (generation)
    # Partial scoring (winogrande): the choices complete the context and this shared continuation
    # is scored after each of them.
    continuation: str | None = None
    metrics: tuple[str, ...] = ("acc",)
    num_fewshot: int = 0
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    answer: AnswerPattern | None = None
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ("\n",)
    description: str = ""
    path: Path | None = field(default=None, compare=False)

    @property
    def choices_complete_context(self) -> bool:
        return self.continuation is not None


class DocFormatter:
    """Renders a card's templates and expressions for one row (a dict of the dataset's fields)."""

    def __init__(self, card: TaskCard):
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        env.filters["regex_sub"] = lambda text, pattern, repl: re.sub(pattern, repl, str(text))
        self.card = card
        try:
            self._prompt = env.from_string(card.prompt)
            self._target = env.compile_expression(card.target, undefined_to_none=False)
            self._choices = (
                env.compile_expression(card.choices, undefined_to_none=False)
                if isinstance(card.choices, str) else None
            )
            self._continuation = (
                env.compile_expression(card.continuation, undefined_to_none=False)
                if card.continuation is not None else None
            )
        except TemplateError as err:
            raise UserError(f"task card {card.name} ({card.path}): bad template or expression: {err}") from None

    def _run(self, what: str, fn, doc: dict[str, Any], convert=lambda value: value):
        # StrictUndefined raises only when a missing field is used, so convert inside the guard.
        try:
            value = fn(**doc)
            if isinstance(value, Undefined):
                value._fail_with_undefined_error()
            return convert(value)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
            raise UserError(
                f"task {self.card.name}: could not evaluate its {what} on a row with fields "
                f"{sorted(doc)} ({type(err).__name__}: {err}); is the data in the task's schema?"
            ) from None

    def text(self, doc: dict[str, Any]) -> str:
        return self._run("prompt", self._prompt.render, doc)

    def choices(self, doc: dict[str, Any]) -> list[str]:
        if self._choices is None:
            return list(self.card.choices or [])
        return self._run("choices", self._choices, doc, lambda value: [str(c) for c in value])

    def gold_text(self, doc: dict[str, Any]) -> str:
        return self._run("target", self._target, doc, str)

    def gold_index(self, doc: dict[str, Any]) -> int:
        return self._run("target", self._target, doc, int)

    def continuation(self, doc: dict[str, Any]) -> str:
        assert self._continuation is not None
        return self._run("continuation", self._continuation, doc, str)


def _tasks_dir() -> Path:
    return evaluate_dir() / "tasks"


def _suites_dir() -> Path:
    return evaluate_dir() / "suites"


def available_tasks() -> list[str]:
    return sorted(p.stem for p in _tasks_dir().glob("*.yaml"))


def available_suites() -> list[str]:
    return sorted(p.stem for p in _suites_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of card fields")
    return data


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name for f in cls.__dataclass_fields__.values()}  # type: ignore[attr-defined]
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as err:
        raise UserError(f"{where}: {err}") from None


def _card_file(folder: Path, name: str) -> Path | None:
    """folder/NAME.yaml, when NAME is a plain name (no path) that has a file there."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = folder / f"{name}.yaml"
    try:
        return path if path.is_file() else None
    except (OSError, ValueError):  # a name too long for the file system, a NUL in it
        return None


def load_card(name: str) -> TaskCard:
    """The card evaluate/tasks/NAME.yaml, validated."""
    path = _card_file(_tasks_dir(), name)
    if path is None:
        close = difflib.get_close_matches(str(name), available_tasks() + available_suites(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"unknown task {name!r:.80}: {hint}tasks are {', '.join(available_tasks())}; "
            f"suites are {', '.join(available_suites())}"
        )
    data = _read_yaml(path)
    data.setdefault("name", name)
    source = _build(DataSource, data.pop("source", None) or {}, f"{path} source")
    answer = data.pop("answer", None)
    card = _build(TaskCard, {
        **data,
        "source": source,
        "answer": _build(AnswerPattern, answer, f"{path} answer") if answer is not None else None,
        "metrics": tuple(data.get("metrics", ("acc",))),
        "stop": tuple(data.get("stop", ("\n",))),
        "path": path,
    }, str(path))
    _validate(card)
    return card


def _validate(card: TaskCard) -> None:
    where = f"task card {card.path}"
    if card.scorer not in SCORERS:
        raise UserError(f"{where}: scorer must be one of {', '.join(SCORERS)}, not {card.scorer!r}")
    if card.scorer == "loglikelihood":
        if card.choices is None:
            raise UserError(f"{where}: a loglikelihood task needs `choices`")
        bad = [m for m in card.metrics if m not in LOGLIKELIHOOD_METRICS]
        if bad:
            raise UserError(f"{where}: metrics {bad} not supported (use {', '.join(LOGLIKELIHOOD_METRICS)})")
    else:
        if card.answer is None:
            raise UserError(f"{where}: a generation task needs an `answer` pattern")
        if card.answer.pick not in ("first", "last") or card.answer.compare not in ("text", "number"):
            raise UserError(f"{where}: answer.pick is first|last and answer.compare is text|number")
    if card.source.synthetic is None and card.source.hub is None:
        raise UserError(f"{where}: source needs `hub` (dataset id) or `synthetic` (generator name)")


def expand_tasks(names: list[str]) -> list[str]:
    """Task names with suites replaced by their tasks, in order, without repeats."""
    out: list[str] = []
    for name in names:
        suite = _card_file(_suites_dir(), name)
        members = _read_yaml(suite).get("tasks", []) if suite is not None else [name]
        for task in members:
            if task not in out:
                out.append(task)
    return out
