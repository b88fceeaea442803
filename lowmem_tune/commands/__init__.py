"""What each command of `lowmem-tune` does, once `cli` has parsed its arguments: one module per
command, each calling into the package's components (planner, training, evaluation, compress)."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def working(what: str) -> Iterator[None]:
    """A transient spinner on standard error while `what` runs (loading a 7B model takes a minute;
    the libraries' own bars are off, see modeling.quiet_library_progress). Nothing when standard
    error is not a terminal, so logs and pipes stay clean."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(what):
        yield
