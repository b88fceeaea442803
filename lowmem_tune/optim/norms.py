"""Gradient norms for clipping, and when scaling a gradient can be skipped."""

from __future__ import annotations

import torch

from lowmem_tune.optim.projector import is_fake

NORM_PIECE = 1 << 20  # values per piece


def squared_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared norm, accumulated in float64 a 1M-value piece at a time, returned in at least
    float32. A float32 norm of a whole 168M-value bf16 embedding gradient took a float32 copy of it
    and came out 4.7% low (measured against float64); pieces in float64 are exact to float32's
    precision, and over that embedding take 0.07 s a step on a 2-core CPU.

    The pieces go through one float64 buffer: `vector_norm(piece, dtype=float64)` allocates an 8 MB
    copy per piece, and on the CPU glibc can serve each from a fresh mapping — 160 mappings a step
    for Gemma's embedding, up to 1 s of page faults. The values, and so the norm, are the same."""
    wide = torch.promote_types(t.dtype, torch.float32)
    flat = t.reshape(-1)
    if flat.numel() <= NORM_PIECE:
        return torch.linalg.vector_norm(flat, dtype=torch.float64).square().to(wide)
    buffer = torch.empty(NORM_PIECE, dtype=torch.float64, device=t.device)
    pieces = []
    for piece in flat.split(NORM_PIECE):
        held = buffer[:piece.numel()].copy_(piece)
        pieces.append(torch.linalg.vector_norm(held).square())
    return torch.stack(pieces).sum().to(wide)


def is_one_on_cpu(scale: torch.Tensor) -> bool:
    """Whether `scale` (a clipping coefficient, a loss's incoming gradient) is a CPU scalar holding
    exactly 1: multiplying a gradient by it changes no bit, and over a 168M-value embedding that
    pass is a few percent of a CPU step. On a GPU reading the value would synchronize, and the pass
    costs next to nothing, so it runs; under `plan --verify` there is no value to read."""
    return scale.device.type == "cpu" and scale.numel() == 1 and not is_fake(scale) and scale.item() == 1.0
