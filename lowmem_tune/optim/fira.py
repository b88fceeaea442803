"""Fira's residual (Chen et al. 2024, arXiv 2410.01623): the gradient outside GaLore's subspace,
scaled like the Adam-normalized update inside it, with a norm-growth limiter.

update = scale * P N + phi ⊙ S, where S = G - P Pᵀ G is the part of the gradient outside the
subspace, phi the ratio ||N|| / ||R|| of the normalized low-rank update N to the low-rank gradient
R per column of R (left projector) or per row (right projector), and ||phi ⊙ S|| is kept within
`limiter` (gamma = 1.01) times its previous value. Where we differ from the reference code: S is
the exact orthogonal complement G - P Pᵀ G (the reference subtracts scale * P Pᵀ G, which is the
complement only when scale = 1), and a column with ||R|| = 0 gets phi = 0 rather than
||N|| / 1e-8. APOLLO (apollo.py) uses the same ratio and limiter on the raw gradient.
"""

from __future__ import annotations

import torch


def channel_ratio(direction: torch.Tensor, low: torch.Tensor, dim: int | None) -> torch.Tensor:
    """||N|| / ||R|| of the normalized low-rank update N to the low-rank gradient R, per column
    (dim 0), per row (dim 1) or for the whole tensor (None), shaped to broadcast over the full
    gradient; 0 where ||R|| = 0. Fira scales its residual by it, APOLLO the raw gradient."""
    wide = torch.promote_types(low.dtype, torch.float32)
    n_norm = torch.linalg.vector_norm(direction.to(wide), dim=dim, keepdim=dim is not None)
    r_norm = torch.linalg.vector_norm(low.to(wide), dim=dim, keepdim=dim is not None)
    return torch.where(r_norm > 0, n_norm / r_norm.clamp(min=torch.finfo(wide).tiny), 0.0)


def projected_dim(sides: tuple[str, ...]) -> int | None:
    """The dimension of R along which `channel_ratio` takes norms: R is r x n for a left projector
    (one ratio per column), m x r for a right one (one per row); None (one ratio) for two-sided."""
    return {("left",): 0, ("right",): 1}.get(sides)


def limit_growth(norm: torch.Tensor, previous_norm: torch.Tensor | None,
                 limiter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor, limited norm): factor = min(1, limiter * previous / norm), which keeps a term's norm
    within `limiter` times the last step's (none at the first step); the limited norm is the next
    step's `previous_norm`."""
    if previous_norm is None:
        return norm.new_ones(()), norm
    factor = (limiter * previous_norm / norm.clamp(min=torch.finfo(norm.dtype).tiny)).clamp(max=1.0)
    return factor, norm * factor


def fira_residual(grad: torch.Tensor, back_projected: torch.Tensor, low: torch.Tensor, direction: torch.Tensor,
                  sides: tuple[str, ...], previous_norm: torch.Tensor | None,
                  limiter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi ⊙ (G - P Pᵀ G), limited; its norm, to pass as `previous_norm` next step)."""
    wide = torch.promote_types(grad.dtype, torch.float32)
    residual = grad.to(wide) - back_projected.to(wide)
    residual.mul_(channel_ratio(direction, low, projected_dim(sides)))
    factor, norm = limit_growth(torch.linalg.vector_norm(residual), previous_norm, limiter)
    residual.mul_(factor)
    return residual, norm
