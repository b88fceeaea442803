"""Rows for a task: from the hub through `datasets`, from a local file, or from our generators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_tune.data.saved import is_saved_dataset, load_saved_rows, saved_splits
from lowmem_tune.errors import UserError, one_line
from lowmem_tune.evaluation.cards import DataSource, TaskCard, load_card, suite_groups

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

    With a local save_to_disk directory that holds the card's few-shot split (MMLU's dev), that
    split; with any other local file the pool is that whole file (each row's own copy excluded, as
    lm-evaluation-harness does when the few-shot split is the evaluated split).
    """
    source = card.source
    if data_file is not None and source.fewshot_split is not None:
        path = Path(data_file).expanduser()
        if source.fewshot_split in saved_splits(path):
            return load_saved_rows(path, source.fewshot_split, "--data-file"), f"{data_file}:{source.fewshot_split}"
    if data_file is not None or source.fewshot_split is None:
        return None, "the evaluated split (each row's own copy excluded)"
    if source.synthetic:
        return _generated(source, source.fewshot_split, source.fewshot_n), f"generated {source.synthetic}:{source.fewshot_split}"
    return _hub_rows(card, source.fewshot_split), f"{source.hub}:{source.fewshot_split}"


_ENTRY_SUFFIXES = ("", ".jsonl", ".json", ".parquet")


def resolve_data_files(data_files: dict[str, str], names: list[str], key: str = "--data-file") -> dict[str, str]:
    """Local data per evaluated task. A key names a task (its file or save_to_disk directory) or a
    suite: then its path is a directory with an entry per task of the suite, named after the task
    or its subject (mmlu=DIR: DIR/anatomy/, DIR/mmlu_anatomy.jsonl, ...); a task's own key wins."""
    suites = {name: [t for t in suite_groups([name]).get(name, []) if t in names]
              for name in data_files if name not in names}
    stray = sorted(name for name, members in suites.items() if not members)
    if stray:
        raise UserError(f"{key} names task(s) {', '.join(map(str, stray))} that are not being evaluated "
                        f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
    out: dict[str, str] = {}
    for name, path in data_files.items():
        if name in names:
            if not Path(path).expanduser().exists():
                raise UserError(f"{key} {name}={path}: no such file or directory")
            out[name] = path
            continue
        members = suites[name]
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UserError(f"{key} {name}={path}: a suite's data is a directory with an entry per task; "
                            "no such directory")
        found, missing = {}, []
        for task in members:
            stems = [task] + ([s] if (s := load_card(task).subject) else [])
            entry = next((folder / f"{stem}{suffix}" for stem in stems for suffix in _ENTRY_SUFFIXES
                          if (folder / f"{stem}{suffix}").exists()), None)
            if entry is None:
                missing.append(stems[-1])
            else:
                found[task] = str(Path(path) / entry.name)
        if missing:
            raise UserError(f"{key} {name}={path}: no entry for {len(missing)} of its {len(members)} tasks "
                            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); give one per task, "
                            "named after the task or its subject (a save_to_disk directory or NAME.jsonl/.json/.parquet)")
        for task, entry in found.items():
            out.setdefault(task, entry)
    for name, path in data_files.items():  # a task's own key wins over its suite's directory
        if name in names:
            out[name] = path
    return out
