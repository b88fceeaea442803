"""Fira's residual (Chen et al. 2024, arXiv 2410.01623): the gradient outside GaLore's subspace,
scaled like the Adam-normalized update inside it, with a norm-growth limiter.

update = scale * P N + phi ⊙ S, where S = G - P Pᵀ G is the part of the gradient outside the
subspace, phi the ratio ||N|| / ||R|| of the normalized low-rank update N to the low-rank gradient
R per column of R (left projector) or per row (right projector), and ||phi ⊙ S|| is kept within
`limiter` (gamma = 1.01) times its previous value. Where we differ from the reference code: S is
the exact orthogonal complement G - P Pᵀ G (the reference subtracts scale * P Pᵀ G, which is the
complement only when scale = 1), and a column with ||R|| = 0 gets phi = 0 rather than
||N|| / 1e-8.
"""

from __future__ import annotations

import torch


def fira_residual(grad: torch.Tensor, back_projected: torch.Tensor, low: torch.Tensor, direction: torch.Tensor,
                  sides: tuple[str, ...], previous_norm: torch.Tensor | None,
                  limiter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi ⊙ (G - P Pᵀ G), limited; its norm, to pass as `previous_norm` next step)."""
    wide = torch.promote_types(grad.dtype, torch.float32)
    residual = grad.to(wide) - back_projected.to(wide)
    dim = {("left",): 0, ("right",): 1}.get(sides)  # R is r x n (one ratio per column) or m x r (per row)
    n_norm = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
    r_norm = torch.linalg.vector_norm(low, dim=dim, keepdim=True)
    tiny = torch.finfo(wide).tiny
    phi = torch.where(r_norm > 0, n_norm / r_norm.clamp(min=tiny), 0.0)
    residual.mul_(phi)
    norm = torch.linalg.vector_norm(residual)
    if previous_norm is not None:
        factor = (limiter * previous_norm / norm.clamp(min=tiny)).clamp(max=1.0)
        residual.mul_(factor)
        norm = norm * factor
    return residual, norm
