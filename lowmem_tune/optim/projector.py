"""The GaLore projector: a rank-r basis of a weight's gradient, refreshed every T optimizer steps.

For a weight W (m x n) with gradient G the projector keeps orthonormal singular vectors of G:
  left  P (m x r): low-rank gradient R = Pᵀ G (r x n), update back to full size P N;
  right Q (r x n): low-rank gradient R = G Qᵀ (m x r), update back to full size N Q;
  full  P and Q  : R = Pᵀ G Qᵀ (r x r).
'std' puts the projector on the smaller dimension (right when m >= n), 'reverse_std' on the larger
one. The SVD runs in float32; the basis is stored in the gradient's dtype (as galore-torch does),
so projecting a bf16 gradient needs no fp32 copy of it.

Improvements over galore-torch 1.0:
- refreshes follow the *global* optimizer step plus a per-matrix `phase`, so with staggered phases
  the SVD work of a model is spread over T steps instead of all landing on the same step, and a
  matrix that sat out some steps (LISA / OwLore) cannot keep a stale basis;
- optional randomized SVD (torch.svd_lowrank with oversampling) for the top-r vectors;
- a NaN/Inf gradient or an SVD that does not converge raises `SVDFailure` naming the parameter;
- `state_dict()` holds plain tensors and numbers only (torch.load(weights_only=True) works).
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_tune.errors import UserError

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("full", "randomized")


class SVDFailure(UserError):
    """The gradient of a GaLore matrix could not be decomposed (NaN/Inf or no convergence)."""


def is_fake(tensor: torch.Tensor) -> bool:
    """True for FakeTensorMode tensors (`plan --verify`): no values to check or decompose."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def top_singular_vectors(matrix: torch.Tensor, rank: int, method: str, seed: int = 0, oversample: int = 8,
                         power_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """U[:, :rank] (m x rank) and Vh[:rank] (rank x n) of a float32 matrix.

    `randomized` is the Halko-Martinsson-Tropp range finder (what torch.svd_lowrank does) with
    `oversample` extra columns and re-orthonormalized power iterations, written out because
    svd_lowrank draws from the global RNG: here the test matrix comes from a generator seeded per
    matrix and step, so a resumed run or a layerwise run reproduces the same basis.
    """
    if method == "full":
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], vh[:rank]
    m, n = matrix.shape
    q = min(rank + oversample, m, n)
    if is_fake(matrix):
        omega = matrix.new_empty((n, q))
    else:
        gen = torch.Generator(device=matrix.device).manual_seed(seed)
        omega = torch.randn((n, q), generator=gen, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ omega).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u_small, _, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u_small)[:, :rank], vh[:rank]


class GaLoreProjector:
    """Projection of one matrix's gradients into a rank-r subspace (see module docstring)."""

    def __init__(self, shape: tuple[int, int], rank: int, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std", svd: str = "full", phase: int = 0, name: str = "") -> None:
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        m, n = shape
        self.shape = (m, n)
        self.rank = min(rank, m, n)
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        self.proj_type = proj_type
        self.svd = svd
        self.phase = phase % update_proj_gap
        self.name = name
        self.left: torch.Tensor | None = None
        self.right: torch.Tensor | None = None
        self.refreshes = 0
        self.stale = False
        """Set when the matrix comes back after being released: refresh at its next step."""
        if proj_type == "full":
            self.sides = ("left", "right")
        elif proj_type == "left" or (proj_type == "std" and m < n) or (proj_type == "reverse_std" and m >= n):
            self.sides = ("left",)
        else:
            self.sides = ("right",)

    # ------------------------------------------------------------------ schedule
    def needs_basis(self) -> bool:
        """No usable basis: never computed, or the matrix came back after being released."""
        return self.stale or (self.left is None and self.right is None)

    def due(self, step: int) -> bool:
        """Whether the basis must be (re)computed from the gradient of optimizer step `step`."""
        return self.needs_basis() or (step - self.phase) % self.update_proj_gap == 0

    def steps_to_refresh(self, step: int) -> int:
        return (self.phase - step) % self.update_proj_gap

    def low_rank_shape(self) -> tuple[int, int]:
        m, n = self.shape
        r = self.rank
        return (r if "left" in self.sides else m, r if "right" in self.sides else n)

    # ------------------------------------------------------------------ refresh
    def refresh(self, grad: torch.Tensor, method: str | None = None, seed: int = 0,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Recompute the basis from a full gradient; returns the previous (left, right) basis.
        `seed` drives the randomized SVD's test matrix."""
        old = (self.left, self.right)
        matrix = grad.detach().float()
        if not is_fake(matrix) and not bool(torch.isfinite(matrix).all()):
            raise SVDFailure(
                f"GaLore: the gradient of {self.name or 'a matrix'} {tuple(self.shape)} contains NaN/Inf, so "
                "its projector cannot be computed (lower train.lr, keep train.max_grad_norm set, check the data)"
            )
        try:
            u, vh = top_singular_vectors(matrix, self.rank, method or self.svd, seed)
        except torch.linalg.LinAlgError as err:
            raise SVDFailure(
                f"GaLore: the SVD of the gradient of {self.name or 'a matrix'} {tuple(self.shape)} did not "
                f"converge ({str(err).splitlines()[0]}); try strategy.svd: randomized or a lower train.lr"
            ) from None
        dtype = grad.dtype
        self.left = u.to(dtype).contiguous() if "left" in self.sides else None
        self.right = vh.to(dtype).contiguous() if "right" in self.sides else None
        self.refreshes += 1
        self.stale = False
        return old

    # ------------------------------------------------------------------ projections
    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """Low-rank gradient R, in the gradient's dtype."""
        out = grad
        if self.left is not None:
            out = self.left.T @ out
        if self.right is not None:
            out = out @ self.right.T
        return out

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        """P R (or R Q, or P R Q) at full size, unscaled."""
        out = low_rank.to(self.left.dtype if self.left is not None else self.right.dtype)
        if self.left is not None:
            out = self.left @ out
        if self.right is not None:
            out = out @ self.right
        return out

    def add_update_(self, weight: torch.Tensor, direction: torch.Tensor, alpha: float) -> None:
        """weight += alpha * scale * (back-projected direction), without a full-size temporary
        for one-sided projectors (addmm_ writes into the weight)."""
        direction = direction.to(weight.dtype)
        a = alpha * self.scale
        if self.left is not None and self.right is None:
            weight.addmm_(self.left.to(weight.dtype), direction, alpha=a)
        elif self.right is not None and self.left is None:
            weight.addmm_(direction, self.right.to(weight.dtype), alpha=a)
        else:
            weight.add_(self.project_back(direction).to(weight.dtype), alpha=a)

    def rotation(self, old_left: torch.Tensor | None, old_right: torch.Tensor | None,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Maps low-rank coordinates in the old basis to the new one: R_new = A R_old B."""
        a = self.left.T.float() @ old_left.float() if self.left is not None and old_left is not None else None
        b = old_right.float() @ self.right.T.float() if self.right is not None and old_right is not None else None
        return a, b

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"left": self.left, "right": self.right, "phase": self.phase,
                "refreshes": self.refreshes, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.left, self.right = state["left"], state["right"]
        self.phase, self.refreshes, self.stale = int(state["phase"]), int(state["refreshes"]), bool(state["stale"])

    def to(self, device: torch.device | str) -> None:
        self.left = self.left.to(device) if self.left is not None else None
        self.right = self.right.to(device) if self.right is not None else None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right) if t is not None)
