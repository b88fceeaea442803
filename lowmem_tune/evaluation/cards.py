"""Task cards: one YAML file per task in evaluate/tasks/, suites in evaluate/suites/.

A card says where the rows come from, how a row becomes a prompt, what the choices or the answer
pattern are and which metrics to report, so a user adds a task by writing YAML. Prompts are Jinja
templates and `choices` / `target` / `continuation` are Jinja expressions over the row's fields, as
in lm-evaluation-harness, so its task definitions translate one to one.

A card with a `subjects` list (mmlu.yaml) is one task per subject, named CARD_SUBJECT: the subject
is the Jinja variable `subject` in its templates and in its `source` strings (the hub config). A
suite lists tasks or other suites; every suite evaluated is also reported as a group.
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
FEWSHOT_SAMPLERS = ("random", "first_n")


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
    # Jinja over the row, put once before the few-shot examples (lm-evaluation-harness' `description`).
    preamble: str = ""
    # random: drawn by one seeded generator; first_n: the few-shot split's first rows, in order (MMLU).
    fewshot_sampler: str = "random"
    subject: str | None = None  # a card of subjects: this task's (the templates' variable `subject`)
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
            self._preamble = env.from_string(card.preamble)
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
            value = fn(**(doc if self.card.subject is None else {**doc, "subject": self.card.subject}))
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

    def preamble(self, doc: dict[str, Any]) -> str:
        return self._run("preamble", self._preamble.render, doc)

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
    """Every task name: a card's, or CARD_SUBJECT for each subject of a card of subjects."""
    names = []
    for path in sorted(_tasks_dir().glob("*.yaml")):
        subjects = _subjects_of(path)
        names += [path.stem] if subjects is None else [f"{path.stem}_{s}" for s in subjects]
    return names


def available_suites() -> list[str]:
    return sorted(p.stem for p in _suites_dir().glob("*.yaml"))


def _subjects_of(path: Path) -> list[str] | None:
    """The `subjects` of a card of subjects, or None for a plain card (or one that does not parse:
    loading it says why)."""
    try:
        subjects = _read_yaml(path).get("subjects")
    except UserError:
        return None
    if subjects is None:
        return None
    if not isinstance(subjects, list) or not subjects or not all(
            isinstance(s, str) and re.fullmatch(r"[A-Za-z0-9][\w-]*", s) for s in subjects):
        raise UserError(f"{path}: subjects must be a non-empty list of plain names (letters, digits, _ and -)")
    if len(set(subjects)) != len(subjects):
        raise UserError(f"{path}: subjects lists a subject twice")
    return subjects


def _listing() -> str:
    """The task names for an error message, a card of subjects as one entry."""
    names = []
    for path in sorted(_tasks_dir().glob("*.yaml")):
        subjects = _subjects_of(path)
        names.append(path.stem if subjects is None else f"{path.stem}_SUBJECT ({len(subjects)} subjects)")
    return ", ".join(names)


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


def _card_of_subject(name: str) -> tuple[Path, str] | None:
    """(the card of subjects, the subject) that the task name CARD_SUBJECT stands for."""
    parts = name.split("_") if isinstance(name, str) else []
    for i in range(1, len(parts)):
        path = _card_file(_tasks_dir(), "_".join(parts[:i]))
        subject = "_".join(parts[i:])
        if path is not None and subject in (_subjects_of(path) or ()):
            return path, subject
    return None


def _unknown(name: str) -> UserError:
    close = difflib.get_close_matches(str(name), available_tasks() + available_suites(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UserError(f"unknown task {name!r:.80}: {hint}tasks are {_listing()}; suites are {', '.join(available_suites())}")


def load_card(name: str) -> TaskCard:
    """The card evaluate/tasks/NAME.yaml, or the subject's task of a card of subjects, validated."""
    path, subject = _card_file(_tasks_dir(), name), None
    if path is not None and (subjects := _subjects_of(path)) is not None:
        suite = f", or all of them with the suite {name}" if _card_file(_suites_dir(), name) else ""
        raise UserError(f"{name} is a card of {len(subjects)} subjects: evaluate one as {name}_SUBJECT "
                        f"(e.g. {name}_{subjects[0]}){suite}")
    if path is None:
        path, subject = _card_of_subject(name) or (None, None)
        if path is None:
            raise _unknown(name)
    data = _read_yaml(path)
    data.pop("subjects", None)
    data.setdefault("name", name)
    raw_source = data.pop("source", None) or {}
    if subject is not None:
        data["name"], data["subject"] = name, subject
        if isinstance(raw_source, dict):
            raw_source = {k: _fill_subject(v, subject, f"{path} source.{k}") for k, v in raw_source.items()}
    source = _build(DataSource, raw_source, f"{path} source")
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


def _fill_subject(value: Any, subject: str, where: str) -> Any:
    """A `source` string of a card of subjects with its `{{ subject }}` filled in."""
    if not isinstance(value, str):
        return value
    try:
        return ImmutableSandboxedEnvironment(undefined=StrictUndefined).from_string(value).render(subject=subject)
    except TemplateError as err:
        raise UserError(f"{where}: bad template ({err}); only {{{{ subject }}}} is known there") from None


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
    if card.fewshot_sampler not in FEWSHOT_SAMPLERS:
        raise UserError(f"{where}: fewshot_sampler must be one of {', '.join(FEWSHOT_SAMPLERS)}, "
                        f"not {card.fewshot_sampler!r}")
    if card.source.synthetic is None and card.source.hub is None:
        raise UserError(f"{where}: source needs `hub` (dataset id) or `synthetic` (generator name)")


def _suite_members(name: str) -> list[str] | None:
    """The names a suite lists (tasks or suites), or None when `name` is no suite."""
    path = _card_file(_suites_dir(), name)
    if path is None:
        return None
    members = _read_yaml(path).get("tasks", [])
    if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
        raise UserError(f"{path}: tasks must be a list of task or suite names")
    return members


def suite_groups(names: list[str]) -> dict[str, list[str]]:
    """Every suite among `names` or inside them (outer first) -> the tasks it expands to, in order."""
    groups: dict[str, list[str]] = {}

    def visit(name: str, inside: tuple[str, ...]) -> list[str]:
        members = _suite_members(name)
        if members is None:
            return [name]
        if name in inside:
            raise UserError(f"suite {name} includes itself ({' -> '.join(inside + (name,))})")
        groups.setdefault(name, [])
        tasks: list[str] = []
        for member in members:
            tasks += [t for t in visit(member, inside + (name,)) if t not in tasks]
        groups[name] = tasks
        return tasks

    for name in names:
        visit(name, ())
    return groups


def expand_tasks(names: list[str]) -> list[str]:
    """Task names with suites (and the suites inside them) replaced by their tasks, in order, without repeats."""
    groups = suite_groups(names)
    out: list[str] = []
    for name in names:
        for task in groups.get(name, [name]):
            if task not in out:
                out.append(task)
    return out
