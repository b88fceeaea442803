"""`LowRankLinear` and the model surgery around it: factorize chosen projections, merge them back.

A low-rank component (LRC) W ≈ L·R keeps the top-k singular directions of W split evenly between
the two factors: L = U_k·√S_k (out×k) and R = √S_k·V_kᵀ (k×in). Splitting √S into both factors
keeps their scales equal, which is what makes plain AdamW on the factors well behaved.
"""

from __future__ import annotations

import torch
from torch import nn

from lowmem_tune.lowrank_grad import LowRankGradientSink, sinked_linear
from lowmem_tune.quantize import Int8Linear, dense_state_dict


class LowRankLinear(nn.Module):
    """y = x·Rᵀ·Lᵀ + b: a linear layer of rank `rank`, stored as two factors."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.left = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.right = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.low_rank_sink: LowRankGradientSink | None = None  # set by the optimizer (lowrank_grad.py)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, svd_device: torch.device | None = None) -> "LowRankLinear":
        """The best rank-`rank` approximation of `linear` (truncated SVD in float32)."""
        weight = linear.weight
        work = weight.detach().to(device=svd_device or weight.device, dtype=torch.float32)
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        root = s[:rank].sqrt()
        module = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                     dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            module.left.copy_((u[:, :rank] * root).to(weight.device))
            module.right.copy_((root[:, None] * vh[:rank]).to(weight.device))
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sinked_linear(sinked_linear(x, self.right, None, self.low_rank_sink), self.left, self.bias,
                             self.low_rank_sink)

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(L, R): the matrices that train."""
        return self.left, self.right

    def quantized(self, group_size: int) -> "Int8LowRankLinear":
        """The same component with INT8 factors (`strategy.weight_bits: 8`; quantize.py)."""
        return Int8LowRankLinear(Int8Linear.from_weight(self.right, None, group_size),
                                 Int8Linear.from_weight(self.left, self.bias, group_size))

    def dense_weight(self) -> torch.Tensor:
        """L·R computed in float32, returned in the factors' dtype."""
        return (self.left.float() @ self.right.float()).to(self.left.dtype)

    def to_linear(self) -> nn.Linear:
        return _dense_linear(self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"


class Int8LowRankLinear(nn.Module):
    """A LowRankLinear whose factors are Int8Linears, `right` (k×in) then `left` (out×k, with the
    bias): each takes GaLore's updates and its low-rank gradient as any INT8 weight does. Its
    state_dict (checkpoints) holds codes and scales; `compressed_state_dict` gives the
    `.left` / `.right` / `.bias` tensors of a compressed directory."""

    def __init__(self, right: Int8Linear, left: Int8Linear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = right.in_features, left.out_features, right.out_features
        self.right, self.left = right, left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(self.right(x))

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(L, R) as gradient handles (quantize.py)."""
        return self.left.weight, self.right.weight

    def dense_weight(self) -> torch.Tensor:
        dtype = self.left.weight.dtype
        return (self.left.dequantized(torch.float32) @ self.right.dequantized(torch.float32)).to(dtype)

    def to_linear(self) -> nn.Linear:
        return _dense_linear(self.dense_weight(), self.left.bias)


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` (out x in) and `bias`, on their device and in their dtype."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                       device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


_COMPRESSED_NAMES = (("left.weight", "left"), ("right.weight", "right"), ("left.bias", "bias"))
"""An Int8LowRankLinear's dense state_dict keys, and the LowRankLinear names a compressed
directory stores them under."""


def compressed_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights as a compressed directory stores them, on the CPU: INT8 matrices dequantized
    to `dtype` (Int8LowRankLinear factors under their LowRankLinear names)."""
    state = dense_state_dict(model, dtype)
    for name, module in model.named_modules():
        if isinstance(module, Int8LowRankLinear):
            for held, stored in _COMPRESSED_NAMES:
                if f"{name}.{held}" in state:
                    state[f"{name}.{stored}"] = state.pop(f"{name}.{held}")
    return state


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def factorize(model: nn.Module, ranks: dict[str, int], svd_device: torch.device | None = None,
              progress: bool = False) -> None:
    """Replace each named nn.Linear by its rank-k truncated SVD, in place."""
    from rich.progress import track

    items = list(ranks.items())
    for name, rank in track(items, description="Factorizing", disable=not progress, transient=True):
        linear = model.get_submodule(name)
        replace_module(model, name, LowRankLinear.from_linear(linear, rank, svd_device))


def install_empty(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named nn.Linear by an uninitialized LowRankLinear of that rank (shapes only:
    for loading saved factors, or for planning under a fake/meta tensor mode)."""
    for name, rank in ranks.items():
        linear = model.get_submodule(name)
        weight = linear.weight
        replace_module(model, name, LowRankLinear(linear.in_features, linear.out_features, rank,
                                                  linear.bias is not None, dtype=weight.dtype, device=weight.device))


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear | Int8LowRankLinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, (LowRankLinear, Int8LowRankLinear))}


def merge_lowrank(model: nn.Module) -> int:
    """Multiply every LowRankLinear back into a dense nn.Linear, in place. Returns how many."""
    merged = lowrank_modules(model)
    for name, module in merged.items():
        replace_module(model, name, module.to_linear())
    return len(merged)
