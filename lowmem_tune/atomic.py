"""Writing files users keep so that a reader (or a crash) never sees half of one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_directory(target: Path, first_wins: bool = False) -> Iterator[Path]:
    """A temporary sibling of `target` to write a directory into; renamed to `target` (which may
    exist only as an empty directory) when the block ends, removed if it fails. `first_wins`: for
    a cache entry that two runs may write at once (complete copies of the same content under one
    key), a `target` another run completed meanwhile stays and this copy is discarded."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        try:
            os.rename(tmp, target)  # atomic; replaces an empty directory, never a filled one
        except OSError as err:
            if not (first_wins and err.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
