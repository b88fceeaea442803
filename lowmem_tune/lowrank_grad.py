"""A linear layer that can hand its weight's gradient over in low rank without forming it.

A linear layer's weight gradient is an outer product, G = dYᵀ X (output gradient t x m, input
t x n). An optimizer that only uses a projection of G (GaLore between its refreshes) can take
that projection from dY and X directly, far cheaper than G; `sinked_linear` is y = x Wᵀ + b whose
backward, when the `LowRankGradientSink` takes the weight at forward, gives the sink dY and X and
autograd no weight gradient. The layers that hold weights (nn.Linear through the optimizer's
forward, `LowRankLinear`'s factors, `Int8Linear` with its own backward) use it; the optimizer
supplies the sink (optim/projected_grad.py). A leaf: torch only.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F


class LowRankGradientSink(Protocol):
    def takes(self, weight: torch.Tensor) -> bool:
        """At forward: whether this micro-batch's gradient of `weight` goes to the sink."""

    def absorb(self, weight: torch.Tensor, grad_out: torch.Tensor, inputs: torch.Tensor) -> None:
        """In backward: the gradient grad_outᵀ inputs of `weight`, as its two factors (2-D)."""


def sink_for(sink: LowRankGradientSink | None, weight: torch.Tensor) -> LowRankGradientSink | None:
    """`sink` if it takes `weight`'s gradient at this forward (which must build a graph), else None."""
    if sink is not None and torch.is_grad_enabled() and weight.requires_grad and sink.takes(weight):
        return sink
    return None


def sinked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  sink: LowRankGradientSink | None) -> torch.Tensor:
    taker = sink_for(sink, weight)
    return F.linear(x, weight, bias) if taker is None else _SinkedLinear.apply(x, weight, bias, taker)


class _SinkedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                sink: LowRankGradientSink) -> torch.Tensor:
        ctx.save_for_backward(x)
        # the parameter itself, not a saved copy: the sink keys its state by it (under activation
        # checkpointing a saved tensor comes back as another object)
        ctx.weight, ctx.sink, ctx.has_bias = weight, sink, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        (x,), weight = ctx.saved_tensors, ctx.weight
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_b = flat_out.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ctx.sink.absorb(weight, flat_out, x.reshape(-1, x.shape[-1]))
        return grad_x, None, grad_b, None
