"""Rows for a task: from the hub through `datasets`, from a local file, or from our generators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_tune.data.saved import is_saved_dataset, load_saved_rows
from lowmem_tune.errors import UserError, one_line
from lowmem_tune.evaluation.cards import DataSource, TaskCard

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _generated(source: DataSource, split: str, n: int) -> list[dict[str, Any]]:
    if source.synthetic != "synthetic-boolq":
        raise UserError(f"unknown generator {source.synthetic!r} in a task card (known: synthetic-boolq)")
    from lowmem_tune.data.synthetic import generate_synthetic_boolq

    return generate_synthetic_boolq(split, n, seed=0)


def load_local_rows(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local JSON / JSONL / parquet file, read with `datasets`, or of a `save_to_disk`
    directory (of a DatasetDict: the split `split`, the card's evaluation split)."""
    path = Path(path).expanduser()
    if is_saved_dataset(path):
        return load_saved_rows(path, split, "--data-file")
    fmt = _LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"--data-file {path}: use a .json, .jsonl or .parquet file or a save_to_disk directory "
                        "in the task's schema")
    if not path.is_file():
        raise UserError(f"--data-file {path}: no such file")
    from datasets import load_dataset

    try:
        return list(load_dataset(fmt, data_files=str(path), split="train"))
    except Exception as err:  # datasets raises many types for a malformed file
        raise UserError(f"--data-file {path}: could not read it as {fmt} ({type(err).__name__}: {err})") from None


def _hub_rows(card: TaskCard, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    source = card.source
    try:
        return list(load_dataset(source.hub, source.config, split=split))
    except (OSError, ValueError) as err:  # offline and uncached: ConnectionError / DatasetNotFoundError
        first = one_line(err)
        raise UserError(
            f"task {card.name}: could not load hub dataset {source.hub!r}"
            f"{f' (config {source.config!r})' if source.config else ''} split {split!r} "
            f"(offline or not cached? {first}) — pass a local copy with --data-file {card.name}=PATH "
            "(.json/.jsonl/.parquet in the dataset's schema)"
        ) from None


def load_task_rows(card: TaskCard, data_file: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    """The rows to evaluate and a description of where they came from."""
    if data_file is not None:
        return load_local_rows(data_file, card.source.split), str(data_file)
    if card.source.synthetic:
        return _generated(card.source, card.source.split, card.source.n), card.source.describe()
    return _hub_rows(card, card.source.split), card.source.describe()


def load_fewshot_rows(card: TaskCard, data_file: str | Path | None) -> tuple[list[dict[str, Any]] | None, str]:
    """The pool few-shot examples are drawn from, or None when it is the evaluated split itself.

    With a local file the pool is that whole file (each row's own copy excluded, as
    lm-evaluation-harness does when the few-shot split is the evaluated split).
    """
    source = card.source
    if data_file is not None or source.fewshot_split is None:
        return None, "the evaluated split (each row's own copy excluded)"
    if source.synthetic:
        return _generated(source, source.fewshot_split, source.fewshot_n), f"generated {source.synthetic}:{source.fewshot_split}"
    return _hub_rows(card, source.fewshot_split), f"{source.hub}:{source.fewshot_split}"
