"""Low-rank weight gradients without the full one, for layerwise GaLore.

Between its refreshes a GaLore matrix W (m x n) only ever uses Pᵀ G (or G Qᵀ), and a linear
layer's weight gradient is an outer product, G = dYᵀ X, of its output gradient dY (t x m) and input
X (t x n). So Pᵀ G = (dY P)ᵀ X: 2t·r(m + n) multiply-adds where autograd spends 2t·mn on G and the
hook another 2mn·r on projecting it, and no m x n gradient is ever allocated. Weight gradients
are about a third of a step's matrix products, so this is most of what GaLore can save over a
dense step (the projection is mathematically the same; `GaLoreProjector.project_outer`).

`ProjectedGradients` hands a `LowRankSink` to the layers holding GaLore matrices: plain nn.Linear
get a forward through `sinked_linear` (lowrank_grad.py), layers that declare a `low_rank_sink`
attribute (`Int8Linear`, `LowRankLinear`) get it set. The sink takes a matrix at a step where it
neither takes nor refreshes a basis (nor is Fira's or APOLLO's, whose updates need G): its
backward hands the low-rank gradient to the optimizer's accumulator and autograd no weight gradient. Otherwise the
layer runs as before and the post-accumulate-grad hooks see G (sketches, refreshes, first bases).
The decision depends only on state that changes at the step or in the matrix's own hook, so an
activation-checkpointing recompute takes the same path as the forward it replays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from lowmem_tune.lowrank_grad import sinked_linear
from lowmem_tune.optim.offload import is_parked

if TYPE_CHECKING:
    from lowmem_tune.optim.galore_adamw import GaLoreAdamW

BASIS_IN_PROGRESS = ("sketch", "deferred", "basis_taken")


class LowRankSink:
    """The optimizer's side of `LowRankGradientSink`."""

    def __init__(self, optimizer: GaLoreAdamW) -> None:
        self.optimizer = optimizer

    def takes(self, weight: torch.Tensor) -> bool:
        """Whether the matrix's gradient at this micro-batch is only ever needed in its subspace."""
        opt = self.optimizer
        if opt.config.variant != "galore" or not opt.is_galore(weight):  # Fira's residual and APOLLO's update need G
            return False
        state = opt.state.get(weight)
        if not state or is_parked(state) or any(key in state for key in BASIS_IN_PROGRESS):
            return False
        return not state["projector"].due(opt.global_step)

    def absorb(self, weight: torch.Tensor, grad_out: torch.Tensor, inputs: torch.Tensor) -> None:
        """Add one micro-batch's low-rank gradient to the accumulator. The full gradient's norm is
        not known then: `low_only` tells the step."""
        state = self.optimizer.state[weight]
        low = state["projector"].project_outer(grad_out, inputs).to(torch.promote_types(weight.dtype, torch.float32))
        state["grad_acc"] = low if "grad_acc" not in state else state["grad_acc"].add_(low)
        state["micro"] = state.get("micro", 0) + 1
        state["low_only"] = True


class ProjectedGradients:
    """Hands `optimizer`'s sink to the layers of `modules` that hold its GaLore matrices;
    `close()` takes it back."""

    def __init__(self, optimizer: GaLoreAdamW, modules: Iterable[nn.Module]) -> None:
        sink = LowRankSink(optimizer)
        holding = [m for m in modules if any(optimizer.is_galore(p) for p in m.parameters(recurse=False))]
        self._linears = [m for m in holding if type(m) is nn.Linear]
        self._declared = [m for m in holding if hasattr(m, "low_rank_sink")]
        for linear in self._linears:
            linear.forward = _sinked_forward(linear, sink)  # shadows nn.Linear.forward on the instance
        for layer in self._declared:
            layer.low_rank_sink = sink

    def close(self) -> None:
        for linear in self._linears:
            linear.__dict__.pop("forward", None)
        for layer in self._declared:
            layer.low_rank_sink = None
        self._linears, self._declared = [], []


def _sinked_forward(linear: nn.Linear, sink: LowRankSink) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return sinked_linear(x, linear.weight, linear.bias, sink)

    return forward
