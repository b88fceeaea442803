"""Writing what users keep so that a reader, a crash or a full disk never leaves half of it.

Two helpers, used for every file and directory the product writes: `atomic_file` and
`atomic_directory`. Both write into a hidden sibling, flush it to disk, rename it into place and
flush the parent, so after a crash the path holds the old content or the new, never a mix.
`remove_interrupted` cleans up (and undoes) what a crash left behind in a directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

_TMP = ".tmp-"
_REPLACED = ".replaced-"


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that takes a path (torch.save, safetensors);
    renamed over `path` when the block ends, removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{_TMP}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_directory(target: Path, first_wins: bool = False, replace: bool = False) -> Iterator[Path]:
    """A temporary sibling of `target` to write a directory into; renamed to `target` when the
    block ends, removed if it fails.

    A `target` that exists (other than as an empty directory) is an error unless one of:
    `first_wins`, for a cache entry two runs may write at once (complete copies of the same content
    under one key): the copy already there stays and this one is discarded; `replace`: the old
    `target` is moved aside before the new one is renamed in and deleted after, so at every instant
    one complete copy exists under a known name (`remove_interrupted` puts it back after a crash)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{_TMP}"))
    try:
        yield tmp
        _fsync_tree(tmp)
        aside = None
        if replace and target.exists() and any(target.iterdir()):
            aside = target.with_name(f".{target.name}{_REPLACED}{os.getpid()}")
            os.rename(target, aside)
        try:
            os.rename(tmp, target)  # atomic; replaces an empty directory, never a filled one
        except OSError as err:
            if not (first_wins and err.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync(target.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_interrupted(directory: Path) -> None:
    """After a crash: delete half-written temporaries in `directory`, and put back a replaced copy
    whose replacement never arrived (a kill between `atomic_directory`'s two renames)."""
    if not Path(directory).is_dir():
        return
    for entry in Path(directory).iterdir():
        name = entry.name
        if name.startswith(".") and _REPLACED in name:
            original = entry.with_name(name[1:name.index(_REPLACED)])
            if original.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with suppress(FileNotFoundError):  # another rank of the same run put it back first
                    os.rename(entry, original)
        elif name.startswith(".") and _TMP in name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))
