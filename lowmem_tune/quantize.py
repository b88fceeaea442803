"""Decoder weights in 8 bits while training (`strategy.weight_bits: 8`).

Every nn.Linear inside the decoder layers becomes an `Int8Linear`: its weight is int8 codes with
one float32 scale per group of `group_size` input features of a row (symmetric: w = code ·
scale, codes in [-127, 127]; a width the group size does not divide ends in a shorter group, as
a WeLore left factor's rank-wide rows do). A WeLore low-rank component becomes an
`Int8LowRankLinear` (compress/lowrank.py): its two factors are Int8Linears. The compute-dtype
copy of a weight is made inside the layer's own forward and backward and freed when they return,
so no 16-bit copy of the model exists at any time. Embeddings, final norm and lm_head keep the
compute dtype.

Gradients: the module's `weight` is a gradient handle, a parameter of the weight's shape backed
by one element (stride 0), so autograd, the backward hooks and GaLore see an ordinary matrix
while it costs no memory; the full gradient the layer's backward produces goes into GaLore's
low-rank accumulator in the hook and is freed, as for a 16-bit weight — or, when the optimizer's
`low_rank_sink` takes the matrix (layerwise GaLore between refreshes), is never formed: the
backward hands the sink the output gradient and input instead (lowrank_grad.py).

Updates (`Int8Linear.apply_update`, called by the optimizer with the projected-back update): a block of
rows is dequantized, the update added and the result requantized with stochastic rounding (the
run's seeded `StochasticRounding`, so resume is bit-exact), or to nearest with
`strategy.rounding: nearest`. A group keeps its scale unless the new values outgrow it or shrink
below half of it, so a code that receives no update stays exactly where it is; such a group is
rescaled to fit its values, with some headroom.

Loading: a 16-bit checkpoint is loaded on the CPU and each decoder layer is quantized as it moves
to the device, one layer at a time. Checkpoints store codes and scales; `dense_state_dict` gives
the plain (dequantized) weights that `final/` is saved with.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from lowmem_tune.layers import decoder_layers, move_to
from lowmem_tune.lowrank_grad import LowRankGradientSink, sink_for

QMAX = 127
GROWTH = 127 / 120
"""A group that outgrows its scale gets this much headroom (7 codes at the edge), so a weight
pushed outward step after step rescales its group rarely, not at every step."""
SHRINK_BELOW = 0.5
"""A group whose values come to use less than this share of its range is rescaled down (with the
same headroom): a weight that shrinks (decay, an update towards zero) never keeps a grid more than
twice as coarse as its values need, i.e. loses at most one of its 8 bits."""
ROW_BLOCK_ELEMENTS = 1 << 20  # values requantized at a time: the float32 working copy is 4 MiB


class Int8Linear(nn.Linear):
    """An nn.Linear whose weight is int8 `codes` (out x in) with float32 `scales` (out x
    in/group_size), both buffers (so in state_dict and checkpoints); `weight` is the gradient
    handle (see module docstring), left out of state_dict."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group_size: int, bias: nn.Parameter | None,
                 dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.weight = nn.Parameter(torch.empty(1, dtype=dtype, device=codes.device).expand(*codes.shape))
        self.bias = bias
        self.low_rank_sink: LowRankGradientSink | None = None  # set by the optimizer (lowrank_grad.py)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias, group_size)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: nn.Parameter | None, group_size: int) -> Int8Linear:
        """Rounded to nearest at load (the smallest error for a fixed scale: absmax / 127 per
        group); trainable when `weight` is."""
        rows, width = weight.shape
        grouped = _grouped(weight.detach().float(), group_size)
        scales = (grouped.abs().amax(dim=-1) / QMAX).clamp_(min=torch.finfo(torch.float32).tiny)
        codes = (grouped / scales[..., None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
        quantized = cls(_ungrouped(codes, width), scales, group_size, bias, weight.dtype)
        quantized.weight.requires_grad_(weight.requires_grad)
        return quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.bias, self, sink_for(self.low_rank_sink, self.weight))

    def dequantized(self, dtype: torch.dtype, start: int = 0, rows: int | None = None) -> torch.Tensor:
        """Rows start .. start + rows of code · scale, in `dtype` (one copy, scaled in place)."""
        rows = self.out_features - start if rows is None else rows
        out = self.codes.narrow(0, start, rows).to(dtype)
        scales = self.scales.narrow(0, start, rows).to(dtype)
        whole = self.in_features // self.group_size
        if whole:
            out[:, :whole * self.group_size].unflatten(1, (whole, self.group_size)).mul_(scales[:, :whole, None])
        if whole < scales.shape[1]:  # the shorter last group
            out[:, whole * self.group_size:].mul_(scales[:, whole:])
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return self.dequantized(self.weight.dtype)

    @torch.no_grad()
    def apply_update(self, update: Callable[[int, int], torch.Tensor], lr: float, weight_decay: float,
                     rounding: Any | None) -> None:
        """w <- w - lr * update, then decoupled decay (w <- w - lr wd w), requantized block by block:
        with `rounding` (a StochasticRounding) unbiased onto the codes, else to nearest."""
        block = max(1, ROW_BLOCK_ELEMENTS // self.in_features)
        for start in range(0, self.out_features, block):
            rows = min(block, self.out_features - start)
            codes, scales = self.codes.narrow(0, start, rows), self.scales.narrow(0, start, rows)
            old = _grouped(codes.float(), self.group_size)
            value = old * scales[..., None]
            delta = _grouped(update(start, rows).float(), self.group_size).mul_(-lr)
            if weight_decay:
                delta.sub_(value + delta, alpha=lr * weight_decay)
            needed = (value + delta).abs_().amax(dim=-1) / QMAX
            refit = (needed > scales) | (needed < scales * SHRINK_BELOW)
            new_scales = torch.where(refit, (needed * GROWTH).clamp_(min=torch.finfo(torch.float32).tiny), scales)
            # where the scale is unchanged, an untouched code stays exactly on its grid point
            target = old.mul_((scales / new_scales)[..., None]).add_(delta.div_(new_scales[..., None]))
            target = rounding.to_grid(target) if rounding is not None else target.round_()
            codes.copy_(_ungrouped(target.clamp_(-QMAX, QMAX), self.in_features))
            scales.copy_(new_scales)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")


def _grouped(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, width) float values as (rows, groups, group_size), the shorter last group padded
    with zeros (which change neither a group's absmax nor, rounded, a code)."""
    pad = -rows.shape[1] % group_size
    return (F.pad(rows, (0, pad)) if pad else rows).reshape(rows.shape[0], -1, group_size)


def _ungrouped(grouped: torch.Tensor, width: int) -> torch.Tensor:
    """The int8 codes of `_grouped` values, back to (rows, width)."""
    return grouped.reshape(grouped.shape[0], -1)[:, :width].to(torch.int8).contiguous()


class _Int8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, handle: torch.Tensor, bias: torch.Tensor | None, layer: Int8Linear,
                sink: LowRankGradientSink | None):
        ctx.layer, ctx.sink = layer, sink
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x)
        return F.linear(x, layer.dequantized(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.layer.dequantized(grad_out.dtype)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.sink is not None:
            ctx.sink.absorb(ctx.layer.weight, flat_out, x.reshape(-1, x.shape[-1]))
        elif ctx.needs_input_grad[1]:
            grad_w = flat_out.T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_out.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None


def quantize_decoder(model: nn.Module, group_size: int, device: torch.device) -> None:
    """Replace every decoder linear by an Int8Linear, and every module that has an INT8 form (a
    `quantized(group_size)` method: WeLore's LowRankLinear) by that form, one layer at a time as
    it moves to `device`; the rest of the model follows (the layers are on `device` already, so
    `.to` leaves their gradient handles as they are)."""
    for layer in decoder_layers(model):
        move_to(layer, device)
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, child_name, Int8Linear.from_linear(child, group_size))
                elif hasattr(child, "quantized"):
                    setattr(parent, child_name, child.quantized(group_size))
    move_to(model, device)


def int8_layers(model: nn.Module) -> dict[nn.Parameter, Int8Linear]:
    """Each Int8Linear by its gradient handle: what the optimizer writes updates through."""
    return {m.weight: m for m in model.modules() if isinstance(m, Int8Linear)}


def dense_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights as a plain transformers model has them, on the CPU: each Int8Linear's
    weight dequantized to `dtype` (one matrix at a time on its device), everything else as is."""
    dense = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith((".codes", ".scales"))}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            dense[f"{name}.weight"] = module.dequantized(dtype).cpu()
    return dense
