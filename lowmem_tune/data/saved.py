"""Datasets written by `datasets`' `save_to_disk`: a Dataset directory, or a DatasetDict directory
with one sub-directory per split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_tune.errors import UserError, one_line


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_saved_rows(path: Path, split: str | None, key: str) -> list[dict[str, Any]]:
    """The rows of a saved Dataset, or of the split `split` of a saved DatasetDict (a DatasetDict
    with one split needs no name). `key` names the setting in errors."""
    import datasets

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
