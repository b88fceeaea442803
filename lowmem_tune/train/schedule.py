"""Learning-rate schedules as pure functions of the optimizer step: nothing to checkpoint."""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, max_steps: int, warmup_steps: int, scheduler: str,
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant, linear or
    cosine decay to `min_lr_ratio * base_lr` at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if scheduler == "constant":
        return base_lr
    span = max(max_steps - warmup_steps - 1, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if scheduler == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * decay)
