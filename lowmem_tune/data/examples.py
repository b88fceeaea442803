"""Training examples: records from the generator, a local file or the hub, rendered as prompt and
response text by a template.

Formats (detected from the record fields unless `data.format` says):
- instruction: instruction / input / output (LLM-Adapters' commonsense_170k, Alpaca);
- boolq: question / passage / answer (bool);
- strategyqa: question / answer (bool), no passage;
- text: a `text` field, trained on entirely;
- messages: a `messages` list of {role, content} (system, user, assistant), a conversation of any
  number of turns;
- sharegpt: a `conversations` list of {from, value} (human, gpt, system).
The chat formats are rendered by a chat template when they are tokenized (data/chat.py), with the
loss on the assistant turns.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem_tune.data.chat import CHAT_FORMATS, Message, conversation
from lowmem_tune.data.saved import is_saved_dataset, load_saved_rows
from lowmem_tune.data.synthetic import generate_synthetic_boolq
from lowmem_tune.errors import UserError, one_line
from lowmem_tune.profile import DataSection

SYNTHETIC = "synthetic-boolq"

# Evaluation task names usable as training sets: hub id, config, format.
HUB_TASKS: dict[str, tuple[str, str | None, str]] = {
    "boolq": ("aps/super_glue", "boolq", "boolq"),
    "strategyqa": ("ChilleD/StrategyQA", None, "strategyqa"),
}

# The prompts match the evaluation prompts (lm-evaluation-harness for BoolQ), so what the model is
# trained to continue is exactly what it is scored on.
TEMPLATES: dict[str, tuple[str, str]] = {
    "boolq": ("{passage}\nQuestion: {question}?\nAnswer:", " {answer}"),
    "strategyqa": ("Question: {question}\nAnswer:", " {answer}"),
    "instruction": (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "{output}",
    ),
    "text": ("", "{text}"),
}

_FORMAT_FIELDS = {
    "instruction": {"instruction", "output"},
    "boolq": {"question", "passage", "answer"},
    "strategyqa": {"question", "answer"},
    "text": {"text"},
    "messages": {"messages"},
    "sharegpt": {"conversations"},
}
_DETECTED = ("instruction", "boolq", "strategyqa", "messages", "sharegpt", "text")

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    messages: tuple[Message, ...] | None = None
    """A conversation (formats messages, sharegpt; prompt and response are then empty)."""


def load_records(section: DataSection) -> tuple[list[dict[str, Any]], str | None]:
    """The raw records and the format they are known to have (None: detect it)."""
    name = section.dataset
    if name == SYNTHETIC:
        if section.split not in ("train", "validation"):
            raise UserError(f"data.split: synthetic-boolq has splits train and validation, not {section.split!r}")
        return generate_synthetic_boolq(section.split, section.num_examples, seed=0), "boolq"
    path = Path(name).expanduser()
    try:
        saved, exists, is_dir, is_file = is_saved_dataset(path), path.exists(), path.is_dir(), path.is_file()
    except OSError as err:  # a name no file system takes: too long, ...
        shown = name if len(name) <= 80 else name[:79] + "…"
        raise UserError(f"data.dataset: {shown!r} is not a usable path ({err.strerror or one_line(err)}); give a "
                        f"local file, a save_to_disk directory, a hub id (owner/name) or {SYNTHETIC}") from None
    if saved:
        return load_saved_rows(path, section.split, "data.dataset"), None
    if path.suffix in _FILE_BUILDERS or exists:
        if is_dir:
            raise UserError(f"data.dataset: {path} is a directory but not a save_to_disk dataset (no "
                            "dataset_dict.json or state.json in it): give a data file or a saved dataset")
        if not is_file:
            raise UserError(f"data.dataset: file not found: {path}")
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise UserError(f"data.dataset: {path}: unsupported file type (use .json, .jsonl, .parquet, .csv or .txt)")
        if path.stat().st_size == 0:
            raise UserError(f"data.dataset: {path} is empty; give a file with records")
        return _load_dataset(builder, None, "train", data_files=str(path)), "text" if builder == "text" else None
    if name in HUB_TASKS:
        hub_id, config, fmt = HUB_TASKS[name]
        return _load_dataset(hub_id, config, section.split), fmt
    if "/" in name:
        return _load_dataset(name, section.config_name, section.split), None
    known = ", ".join([SYNTHETIC, *HUB_TASKS])
    raise UserError(f"data.dataset: {name!r} is not a local file or save_to_disk directory, a hub id (owner/name) or "
                    f"a known task ({known})")


def _load_dataset(path: str, config: str | None, split: str, data_files: str | None = None) -> list[dict[str, Any]]:
    import datasets

    from datasets.exceptions import DatasetGenerationError

    try:
        ds = datasets.load_dataset(path, config, split=split, data_files=data_files)
    except (FileNotFoundError, ConnectionError, OSError, ValueError, DatasetGenerationError, StopIteration) as err:
        # A file the builder could not read (not UTF-8, not CSV, ...) comes wrapped: its cause says why;
        # one with no records at all (blank lines) ends the builder's first read (StopIteration).
        cause = err.__cause__ if isinstance(err, DatasetGenerationError) and err.__cause__ else err
        first = one_line(cause) if not isinstance(cause, StopIteration) else "no records in it"
        where = data_files or path
        hint = ("; give a UTF-8 file of records in that format" if data_files else
                " (offline and not cached? download it first, or pass a local file)")
        raise UserError(f"data.dataset: could not load {where!r} split {split!r}: {first}{hint}") from None
    return [dict(row) for row in ds]


def detect_format(records: list[dict[str, Any]], declared: str) -> str:
    if declared != "auto":
        return declared
    if not records:
        raise UserError("data.dataset: the dataset has no records")
    fields = set(records[0])
    for fmt in _DETECTED:
        if _FORMAT_FIELDS[fmt] <= fields:
            return fmt
    raise UserError(
        f"data.format: cannot tell the format from the fields {sorted(fields)}; set data.format "
        f"({', '.join(_DETECTED)}) and data.prompt_template"
    )


def _render(template: str, record: dict[str, Any], where: str) -> str:
    values = {k: ("yes" if v else "no") if isinstance(v, bool) else ("" if v is None else v) for k, v in record.items()}
    try:
        return template.format_map(values)
    except KeyError as err:
        raise UserError(f"{where}: the template uses {{{err.args[0]}}} but records have {sorted(record)}") from None
    except (ValueError, IndexError, AttributeError, TypeError, MemoryError) as err:  # "{", "{0}", "{question.x}"
        raise _bad_template(template, where, one_line(err, 120), record) from None


def _bad_template(template: str, where: str, why: str, record: dict[str, Any]) -> UserError:
    shown = template if len(template) <= 80 else template[:79] + "…"
    return UserError(f"{where}: {shown!r} is not a usable template ({why}); name record fields as {{field}} "
                     f"(fields: {', '.join(sorted(map(str, record)))}) and write a literal brace as {{{{ or }}}}")


def _check_template(template: str, where: str, record: dict[str, Any]) -> None:
    """A format spec that pads to a width of 10,000 or more (`{question:>999999999}`) would build
    gigabytes of text per example: refused before any is rendered."""
    try:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(template) if spec]
    except ValueError as err:  # "{", "}"
        raise _bad_template(template, where, one_line(err, 120), record) from None
    for spec in specs:
        if re.search(r"\d{5,}", spec):
            raise _bad_template(template, where, f"the format spec {spec[:40]!r} pads to a huge width", record)


def render_examples(records: list[dict[str, Any]], section: DataSection,
                    known_format: str | None = None) -> tuple[list[Example], str]:
    """The records rendered by the format's (or the profile's) templates, and the format."""
    fmt = detect_format(records, section.format if section.format != "auto" else (known_format or "auto"))
    if fmt in CHAT_FORMATS:
        return _conversations(records, section, fmt), fmt
    if section.chat_template is not None:
        raise UserError(f"data.chat_template: applies to the chat formats ({', '.join(CHAT_FORMATS)}), and these "
                        f"records are format {fmt}; remove it or set data.format")
    prompt_t, response_t = TEMPLATES[fmt]
    prompt_t = section.prompt_template if section.prompt_template is not None else prompt_t
    response_t = section.response_template if section.response_template is not None else response_t
    missing = _FORMAT_FIELDS[fmt] - set(records[0]) if records else set()
    if missing and section.prompt_template is None:
        raise UserError(f"data.format: {fmt} records need the fields {sorted(missing)}")
    for template, where in ((prompt_t, "data.prompt_template"), (response_t, "data.response_template")):
        _check_template(template, where, records[0] if records else {})
    examples = [
        Example(_render(prompt_t, r, "data.prompt_template"), _render(response_t, r, "data.response_template"))
        for r in records
    ]
    return examples, fmt


def _conversations(records: list[dict[str, Any]], section: DataSection, fmt: str) -> list[Example]:
    for key in ("prompt_template", "response_template"):
        if getattr(section, key) is not None:
            raise UserError(f"data.{key}: does not apply to format {fmt} (a chat template renders conversations: "
                            "data.chat_template); remove it")
    missing = _FORMAT_FIELDS[fmt] - set(records[0]) if records else set()
    if missing:
        raise UserError(f"data.format: {fmt} records need the field {sorted(missing)[0]!r}; these have "
                        f"{sorted(map(str, records[0]))}")
    return [Example("", "", conversation(record, fmt, i)) for i, record in enumerate(records)]


def load_examples(section: DataSection) -> list[Example]:
    """Records of the configured dataset rendered as examples, limited to `data.limit`."""
    return load_examples_and_format(section)[0]


def load_examples_and_format(section: DataSection) -> tuple[list[Example], str]:
    """`load_examples` and the format the records were rendered in (detected or `data.format`)."""
    records, known = load_records(section)
    if section.limit is not None:
        records = records[: section.limit]
    return render_examples(records, section, known)
