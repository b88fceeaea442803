"""Time spent in marked sections of a step without synchronizing the device for it."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class SectionTimer:
    """Seconds inside `section()` blocks since the last `take()`. On a GPU the blocks are bracketed
    by CUDA events and read at `take()`, which the training loop calls after its one host
    synchronization of the step (so the events are done and reading them does not wait); on the CPU,
    where work is synchronous, the wall clock is exact."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def section(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda" and torch.cuda.is_available():  # not under fake CUDA tensors
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - began

    def take(self) -> float:
        total = self._seconds + sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
        self._seconds, self._events = 0.0, []
        return total
