"""Where the dashboard's events come from: a live run in this process, or a run directory.

Both are polled by the app's refresh timer with `drain()`; nothing here ever blocks the side
that produces events.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Protocol

from lowmem_tune.errors import UserError
from lowmem_tune.events import Event, RunWarning, event_from_json


class Feed(Protocol):
    def drain(self) -> list[Event]:
        """Every event that arrived since the last call (possibly none)."""

    @property
    def closed(self) -> bool:
        """True once no more events will come."""


class QueueFeed:
    """An `EventSink` for the training thread: `emit` only puts on a lock-free queue."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._closed = False

    def emit(self, event: Event) -> None:
        self._queue.put(event)

    def close(self) -> None:
        """The producer is done. Events already queued are still drained."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed and self._queue.empty()

    def drain(self) -> list[Event]:
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events


class RunDirFeed:
    """Tails RUN_DIR/events.jsonl: the whole history on the first drain, then new lines as the
    run appends them. A line still being written is kept until its newline arrives."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "events.jsonl"
        self._offset = 0
        self._partial = b""
        self._line_number = 0

    @classmethod
    def open(cls, run_dir: Path) -> RunDirFeed:
        """Checks that `run_dir` holds a run's events, with a message that says what to do if not."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise UserError(f"monitor: run directory not found: {run_dir} (pass the output.dir of a run)")
        events_file = run_dir / "events.jsonl"
        if not events_file.is_file() or events_file.stat().st_size == 0:
            raise UserError(
                f"monitor: {run_dir} holds no events yet (no events.jsonl): is it a run's output.dir, and has the run started?"
            )
        return cls(run_dir)

    @property
    def closed(self) -> bool:
        return False  # a run directory can always be resumed and grow

    def drain(self) -> list[Event]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        events: list[Event] = []
        for line in lines:
            self._line_number += 1
            if not line.strip():
                continue
            try:
                events.append(event_from_json(line.decode("utf-8")))
            except (ValueError, KeyError, TypeError) as err:
                events.append(RunWarning(f"{self.path}: line {self._line_number} unreadable ({err})"))
        return events
