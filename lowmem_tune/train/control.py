"""Requests into a running training loop from other threads (dashboard keys) or signals."""

from __future__ import annotations

import threading


class RunControl:
    """Thread-safe flags the loop polls between optimizer steps: stop (after a checkpoint) and
    save-a-checkpoint-now. Training never waits on whoever sets them."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._checkpoint = threading.Event()
        self._abort = threading.Event()

    def request_stop(self) -> None:
        """Graceful stop: checkpoint at the next step boundary, then finish."""
        self._stop.set()

    def request_checkpoint(self) -> None:
        self._checkpoint.set()

    def request_abort(self) -> None:
        """Stop at the next step boundary without writing anything more."""
        self._abort.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def abort_requested(self) -> bool:
        return self._abort.is_set()

    def take_checkpoint_request(self) -> bool:
        """True once per request."""
        if self._checkpoint.is_set():
            self._checkpoint.clear()
            return True
        return False
