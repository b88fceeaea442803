"""One Adam update of one parameter, from its (clipped) gradient to its new value: the moments
(`moments.py`), the GaLore back-projection and Fira's residual for a GaLore matrix, decoupled
weight decay, and the write into the weight — in place, or through `RoundingWriter` (stochastic
rounding) for bf16 / fp16 weights when one is given."""

from __future__ import annotations

from typing import Any

import torch

from lowmem_tune.optim.fira import fira_residual
from lowmem_tune.optim.moments import BLOCKSIZE, Blockwise8bitMoments, Fp32Moments, storage_of
from lowmem_tune.optim.projector import GaLoreProjector
from lowmem_tune.optim.writer import RoundingWriter, WeightStore


def _rounds(writer: RoundingWriter | None, p: torch.Tensor) -> bool:
    return writer is not None and writer.applies_to(p)


def dense_step(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor,
               writer: RoundingWriter | None) -> None:
    """AdamW on a tensor outside GaLore."""
    lr, wd, betas, eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
    if storage_of(state) is Blockwise8bitMoments:
        if not _rounds(writer, p):
            Blockwise8bitMoments.step_into(state, grad, p, betas, eps, lr, wd)
            return
        state["step"] += 1
        flat = grad.reshape(-1)
        per_row = flat.numel() // p.shape[0]

        def update_in_place(start: int, value: torch.Tensor) -> None:
            Blockwise8bitMoments.update_range(state, flat.narrow(0, start * per_row, value.numel()), value,
                                              start * per_row, betas, eps, lr, wd)

        writer.apply_in_place(p, update_in_place, align=BLOCKSIZE)
        return
    if _rounds(writer, p):  # moments and direction a row block at a time, as the writer goes
        rows_direction = Fp32Moments.rows_direction(state, betas, eps)
        writer.apply(p, lambda start, rows: rows_direction(grad.narrow(0, start, rows), start, rows), lr, wd)
        return
    direction = storage_of(state).direction(state, grad.to(torch.promote_types(grad.dtype, torch.float32)), betas, eps)
    p.add_(direction.to(p.dtype), alpha=-lr)
    if wd:
        p.add_(p, alpha=-lr * wd)


def galore_step(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], low: torch.Tensor,
                writer: RoundingWriter | None, fira: bool, fira_limiter: float, store: WeightStore | None = None) -> None:
    """AdamW in a GaLore matrix's subspace, projected back (plus Fira's residual), written into the
    weight or handed to its `store` (INT8 weights)."""
    lr, wd = group["lr"], group["weight_decay"]
    proj: GaLoreProjector = state["projector"]
    direction = storage_of(state).direction(state, low, group["betas"], group["eps"])
    residual = None
    if fira:
        residual, state["fira_prev"] = fira_residual(p.grad, proj.project_back(low), low, direction, proj.sides,
                                                     state.get("fira_prev"), fira_limiter)
    def update(start: int, rows: int) -> torch.Tensor:
        out = proj.back_projected_rows(direction, start, rows)
        return out if residual is None else out.add_(residual.narrow(0, start, rows))

    if store is not None:
        store.apply_update(update, lr, wd, writer.rounding if writer is not None else None)
        return
    if _rounds(writer, p):
        writer.apply(p, update, lr, wd)
        return
    if residual is not None:
        p.add_(residual.to(p.dtype), alpha=-lr)
    proj.add_update_(p, direction, alpha=-lr)
    if wd:
        p.add_(p, alpha=-lr * wd)
