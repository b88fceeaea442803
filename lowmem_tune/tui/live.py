"""A training run in a worker thread, its events flowing into a `QueueFeed`."""

from __future__ import annotations

import sys
import threading
from typing import Any

from lowmem_tune.profile import Profile
from lowmem_tune.train.control import RunControl
from lowmem_tune.tui.feeds import QueueFeed


class LiveRun:
    def __init__(self, profile: Profile, resume: bool) -> None:
        self.profile = profile
        self.resume = resume
        self.feed = QueueFeed()
        self.control = RunControl()
        self.outcome: Any = None
        self.error: BaseException | None = None
        # Daemon: if the main thread dies anyway, the process must not train on with no screen.
        self._thread = threading.Thread(target=self._train, name="lowmem-tune-training", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _train(self) -> None:
        from lowmem_tune.train import run_training

        try:
            self.outcome = run_training(self.profile, resume=self.resume, sink=self.feed, control=self.control)
        except BaseException as err:  # handed to the main thread, which raises it after the app closes
            self.error = err
        finally:
            self.feed.close()

    def finish(self) -> int:
        """Wait for the run (asking it to checkpoint and stop if it is still going) and return its
        exit code, or raise what it raised."""
        if self._thread.is_alive():
            self.control.request_stop()
            print("lowmem-tune: stopping the run (checkpoint at the next step; ctrl+c again aborts)…",
                  file=sys.stderr)
            try:
                self._thread.join()
            except KeyboardInterrupt:
                self.control.request_abort()
                self._thread.join()
        if self.error is not None:
            raise self.error
        return self.outcome.exit_code
