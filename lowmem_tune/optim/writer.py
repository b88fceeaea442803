"""Writing an update into a 16-bit weight with stochastic rounding, a block of rows at a time.

The update is formed in float32 for one block (so the working copy is one block, never the whole
matrix), added to the block's float32 value and rounded back with `StochasticRounding`; weight
decay after the update, as galore-torch and our Adam do. `apply_in_place` hands the block's
float32 value to an update that writes it itself: bitsandbytes' 8-bit kernel, which decays first.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Protocol

import torch

from lowmem_tune.optim.rounding import StochasticRounding

BLOCK_ELEMENTS = 1 << 20
"""Values per block: a 4 MiB float32 working copy, plus as much for the update and the noise."""

RowsUpdate = Callable[[int, int], torch.Tensor]
"""update(start, rows): the float32 update of rows start .. start + rows (the step before the lr)."""
InPlaceUpdate = Callable[[int, torch.Tensor], None]
"""update(start, value): applies the whole step (lr and weight decay included) to `value`, the
float32 copy of the rows from `start` on."""


class WeightStore(Protocol):
    """A matrix whose values are not its parameter's (INT8 weights: the parameter is a gradient
    handle); the optimizer hands it the update instead of writing the parameter."""

    def apply_update(self, update: RowsUpdate, lr: float, weight_decay: float, rounding: Any | None) -> None: ...


def row_blocks(weight: torch.Tensor, align: int = 1) -> Iterator[tuple[int, int]]:
    """(start, rows) blocks covering dim 0 of `weight`, each holding a multiple of `align` values
    (bitsandbytes' 8-bit state is blockwise in flat order) except possibly the last."""
    per_row = math.prod(weight.shape[1:])
    rows = max(1, BLOCK_ELEMENTS // max(per_row, 1))
    step = align // math.gcd(per_row, align)
    rows = -(-rows // step) * step
    total = weight.shape[0]
    for start in range(0, total, rows):
        yield start, min(rows, total - start)


class RoundingWriter:
    def __init__(self, rounding: StochasticRounding) -> None:
        self.rounding = rounding

    @staticmethod
    def applies_to(weight: torch.Tensor) -> bool:
        return weight.dtype in (torch.bfloat16, torch.float16)

    @torch.no_grad()
    def apply(self, weight: torch.Tensor, update: RowsUpdate, lr: float, weight_decay: float = 0.0) -> None:
        """weight <- round(w - lr * update - lr * wd * (w - lr * update)): decay after the update."""
        for start, rows in row_blocks(weight):
            block = weight.narrow(0, start, rows)
            value = block.float()
            value.add_(update(start, rows), alpha=-lr)
            if weight_decay:
                value.add_(value, alpha=-lr * weight_decay)
            self.rounding.round_into(block, value)

    @torch.no_grad()
    def apply_in_place(self, weight: torch.Tensor, update: InPlaceUpdate, align: int = 1) -> None:
        """weight <- round(update(w)), for an update that writes a block's float32 value itself
        (bitsandbytes' 8-bit kernel): no separate update tensor is formed."""
        for start, rows in row_blocks(weight, align):
            block = weight.narrow(0, start, rows)
            value = block.float()
            update(start, value)
            self.rounding.round_into(block, value)
