"""Low-rank weight gradients without the full one, for layerwise GaLore.

Between its refreshes a GaLore matrix W (m x n) only ever uses Pᵀ G (or G Qᵀ), and a linear
layer's weight gradient is an outer product, G = dYᵀ X, of its output gradient dY (t x m) and input
X (t x n). So Pᵀ G = (dY P)ᵀ X: 2t·r(m + n) multiply-adds where autograd spends 2t·mn on G and the
hook another 2mn·r on projecting it, and no m x n gradient is ever allocated. Weight gradients
are about a third of a step's matrix products, so this is most of what GaLore can save over a
dense step (the projection is mathematically the same; `GaLoreProjector.project_outer`).

`ProjectedGradients` gives each plain nn.Linear whose weight is a GaLore matrix a forward that
decides per call: at a step where the matrix neither takes nor refreshes a basis (nor is Fira,
whose residual needs G) the layer runs through `_ProjectedLinear`, whose backward hands the low-rank
gradient to the optimizer's accumulator and returns no weight gradient; otherwise it is the
plain linear and the post-accumulate-grad hooks see G as before (sketches, refreshes, first bases).
A layer with its own autograd function (INT8 weights, quantize.py) declares a `low_rank_sink`
attribute instead, and gets a `LowRankSink` that makes the same decision.
The decision depends only on state that changes at the step or in the matrix's own hook, so an
activation-checkpointing recompute takes the same path as the forward it replays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lowmem_tune.optim.offload import is_parked

if TYPE_CHECKING:
    from lowmem_tune.optim.galore_adamw import GaLoreAdamW

BASIS_IN_PROGRESS = ("sketch", "deferred", "basis_taken")


def projects_in_backward(optimizer: GaLoreAdamW, p: torch.Tensor) -> bool:
    """Whether p's gradient at this micro-batch is only ever needed in its current subspace."""
    if optimizer.variant == "fira" or not optimizer.is_galore(p):
        return False
    state = optimizer.state.get(p)
    if not state or is_parked(state) or any(key in state for key in BASIS_IN_PROGRESS):
        return False
    return not state["projector"].due(optimizer.global_step)


def absorb_outer(optimizer: GaLoreAdamW, p: torch.Tensor, grad_out: torch.Tensor, inputs: torch.Tensor) -> None:
    """Add the low-rank gradient of one micro-batch (G = grad_outᵀ inputs) to p's accumulator.
    The full gradient's norm is not known then: `low_only` tells the step."""
    state = optimizer.state[p]
    low = state["projector"].project_outer(grad_out, inputs).to(torch.promote_types(p.dtype, torch.float32))
    state["grad_acc"] = low if "grad_acc" not in state else state["grad_acc"].add_(low)
    state["micro"] = state.get("micro", 0) + 1
    state["low_only"] = True


class _ProjectedLinear(torch.autograd.Function):
    """y = x Wᵀ + b; backward returns the input and bias gradients and no weight gradient: the
    weight's low-rank gradient goes to the optimizer instead."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                optimizer: GaLoreAdamW) -> torch.Tensor:
        ctx.save_for_backward(x)
        # the parameter itself, not a saved copy: its optimizer state is keyed by it (under
        # activation checkpointing a saved tensor comes back as another object)
        ctx.weight, ctx.optimizer, ctx.has_bias = weight, optimizer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        (x,), weight = ctx.saved_tensors, ctx.weight
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_b = flat_out.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        absorb_outer(ctx.optimizer, weight, flat_out, x.reshape(-1, x.shape[-1]))
        return grad_x, None, grad_b, None


class LowRankSink:
    """What a layer with its own backward asks: `takes(weight)` at forward, `absorb` in backward."""

    def __init__(self, optimizer: GaLoreAdamW) -> None:
        self.optimizer = optimizer

    def takes(self, weight: torch.Tensor) -> bool:
        return projects_in_backward(self.optimizer, weight)

    def absorb(self, weight: torch.Tensor, grad_out: torch.Tensor, inputs: torch.Tensor) -> None:
        absorb_outer(self.optimizer, weight, grad_out, inputs)


class ProjectedGradients:
    """Installs the deciding forward on `modules`' GaLore linears (or their `low_rank_sink`);
    `close()` takes it out."""

    def __init__(self, optimizer: GaLoreAdamW, modules: Iterable[nn.Module]) -> None:
        galore = [m for m in modules if isinstance(m, nn.Linear) and optimizer.is_galore(m.weight)]
        self._linears = [m for m in galore if type(m) is nn.Linear]
        self._sinks = [m for m in galore if hasattr(m, "low_rank_sink")]
        for linear in self._linears:
            linear.forward = _deciding_forward(linear, optimizer)  # shadows nn.Linear.forward on the instance
        for layer in self._sinks:
            layer.low_rank_sink = LowRankSink(optimizer)

    def close(self) -> None:
        for linear in self._linears:
            linear.__dict__.pop("forward", None)
        for layer in self._sinks:
            layer.low_rank_sink = None
        self._linears, self._sinks = [], []


def _deciding_forward(linear: nn.Linear, optimizer: GaLoreAdamW) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = linear.weight
        if torch.is_grad_enabled() and weight.requires_grad and projects_in_backward(optimizer, weight):
            return _ProjectedLinear.apply(x, weight, linear.bias, optimizer)
        return F.linear(x, weight, linear.bias)

    return forward
