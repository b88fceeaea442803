"""The GaLore projector: a rank-r basis of a weight's gradient, refreshed every T optimizer steps.

For a weight W (m x n) with gradient G the projector keeps orthonormal singular vectors of G:
  left  P (m x r): low-rank gradient R = Pᵀ G (r x n), update back to full size P N;
  right Q (r x n): low-rank gradient R = G Qᵀ (m x r), update back to full size N Q;
  full  P and Q  : R = Pᵀ G Qᵀ (r x r).
'std' puts the projector on the smaller dimension (right when m >= n), 'reverse_std' on the larger
one. The basis is stored in the weight's compute dtype (as galore-torch does), so projecting a
bf16 gradient needs no fp32 copy of it. Where a basis comes from is `subspace.py`'s job; a
one-sided basis is handled there "oriented": as the d x r matrix B on the projected side (B = P,
or B = Qᵀ), the gradient as A = G or Gᵀ.

A basis may hold fewer than r directions: when the gradient supports fewer (its numerical rank
is below r), the other columns are zero and `supported` says how many are not; such a matrix is
due again at its next step, which fills the empty columns (see subspace.py).

Improvements over galore-torch 1.0:
- refreshes follow the *global* optimizer step plus a per-matrix `phase`, so with staggered phases
  the SVD work of a model is spread over T steps instead of all landing on the same step, and a
  matrix that sat out some steps (LISA / OwLore) cannot keep a stale basis;
- a NaN/Inf gradient or an SVD that does not converge raises `SVDFailure` naming the parameter;
- `state_dict()` holds plain tensors and numbers only (torch.load(weights_only=True) works).
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_tune.errors import UserError

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class SVDFailure(UserError):
    """The gradient of a GaLore matrix could not be decomposed (NaN/Inf or no convergence)."""


def is_fake(tensor: torch.Tensor) -> bool:
    """True for FakeTensorMode tensors (`plan --verify`): no values to check or decompose."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def as_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` in row-major layout. A clone rather than `.contiguous()`: the same copy, and it also runs
    on fake CUDA tensors, where the device-placement tests check every step without a GPU."""
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


class GaLoreProjector:
    """Projection of one matrix's gradients into a rank-r subspace (see module docstring)."""

    def __init__(self, shape: tuple[int, int], rank: int, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std", phase: int = 0, name: str = "") -> None:
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
        m, n = shape
        self.shape = (m, n)
        self.rank = min(rank, m, n)
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        self.proj_type = proj_type
        self.phase = phase % update_proj_gap
        self.name = name
        self.left: torch.Tensor | None = None
        self.right: torch.Tensor | None = None
        self.refreshes = 0
        self.supported = 0
        """Columns of the basis that hold a direction (the rest are zero until filled)."""
        self.top_singular_value = 0.0
        """The gradient's largest singular value at the last refresh: the scale for rank decisions."""
        self.fill_exhausted = False
        """A fill found no new direction: wait for the next scheduled refresh instead of every step."""
        self.stale = False
        """Set when the matrix comes back after being released: a new basis at its next step."""
        if proj_type == "full":
            self.sides = ("left", "right")
        elif proj_type == "left" or (proj_type == "std" and m < n) or (proj_type == "reverse_std" and m >= n):
            self.sides = ("left",)
        else:
            self.sides = ("right",)

    @classmethod
    def for_group(cls, group: dict[str, Any], shape: tuple[int, int], phase: int, name: str) -> GaLoreProjector:
        """The projector a GaLore param group (galore-torch's keys) asks for."""
        return cls(shape, group["rank"], group["update_proj_gap"], group.get("scale", 1.0),
                   group.get("proj_type", "std"), phase, name)

    # ------------------------------------------------------------------ schedule
    def needs_basis(self) -> bool:
        """No usable basis: never computed, or the matrix came back after being released."""
        return self.stale or (self.left is None and self.right is None)

    def incomplete(self) -> bool:
        """Empty columns to fill at the next step."""
        return not self.needs_basis() and self.supported < self.rank and not self.fill_exhausted

    def due(self, step: int) -> bool:
        """Whether the basis must be (re)computed, or its empty columns filled, at optimizer step `step`."""
        return self.needs_basis() or self.incomplete() or (step - self.phase) % self.update_proj_gap == 0

    def steps_to_refresh(self, step: int) -> int:
        return (self.phase - step) % self.update_proj_gap

    def held_bytes(self, element_size: int) -> int:
        """The float32 accumulator of a low-rank gradient and the basis (in weights of
        `element_size` bytes) that this matrix holds once it has a basis."""
        m, n = self.shape
        basis_rows = {("left",): m, ("right",): n}.get(self.sides, m + n)
        low_m, low_n = self.low_rank_shape()
        return 4 * low_m * low_n + basis_rows * self.rank * element_size

    def low_rank_shape(self) -> tuple[int, int]:
        m, n = self.shape
        r = self.rank
        return (r if "left" in self.sides else m, r if "right" in self.sides else n)

    # ------------------------------------------------------------------ one-sided bases, oriented
    @property
    def one_sided(self) -> bool:
        return len(self.sides) == 1

    def orient(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with the projected side first: G (left) or Gᵀ (right)."""
        return grad if self.sides == ("left",) else grad.T

    def oriented_basis(self) -> torch.Tensor | None:
        """B (d x r): P, or Qᵀ."""
        if self.sides == ("left",):
            return self.left
        return None if self.right is None else self.right.T

    def set_oriented_basis(self, basis: torch.Tensor, supported: int, top_singular_value: float,
                           dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Install B (d x r, zero columns beyond the supported ones); returns the previous (left, right)."""
        old = (self.left, self.right)
        basis = as_contiguous(basis.to(dtype))
        if self.sides == ("left",):
            self.left = basis
        else:
            self.right = as_contiguous(basis.T)
        self.fill_exhausted = self.incomplete() and supported == self.supported
        self.supported = supported
        self.top_singular_value = top_singular_value
        self.refreshes += 1
        self.stale = False
        return old

    def set_two_sided_basis(self, left: torch.Tensor, right: torch.Tensor, top_singular_value: float,
                            dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        old = (self.left, self.right)
        self.left, self.right = as_contiguous(left.to(dtype)), as_contiguous(right.to(dtype))
        self.supported, self.top_singular_value = self.rank, top_singular_value
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

    def project_outer(self, grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Low-rank gradient R of G = grad_outᵀ inputs (t x m and t x n: a linear layer's output
        gradient and input), in their dtype, without forming G: Pᵀ G = (grad_out P)ᵀ inputs and
        G Qᵀ = grad_outᵀ (inputs Qᵀ), 2t·r(m + n) multiply-adds instead of G's 2t·mn."""
        if self.left is not None:
            grad_out = grad_out @ self.left
        if self.right is not None:
            inputs = inputs @ self.right.T
        return grad_out.T @ inputs

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        """P R (or R Q, or P R Q) at full size, unscaled."""
        out = low_rank.to(self.left.dtype if self.left is not None else self.right.dtype)
        if self.left is not None:
            out = self.left @ out
        if self.right is not None:
            out = out @ self.right
        return out

    def back_projected_rows(self, direction: torch.Tensor, start: int, rows: int) -> torch.Tensor:
        """Rows start..start+rows of scale * (back-projected direction), in float32."""
        if self.sides == ("left",):
            out = self.left.narrow(0, start, rows).float() @ direction.float()
        elif self.sides == ("right",):
            out = direction.narrow(0, start, rows).float() @ self.right.float()
        else:
            out = (self.left.narrow(0, start, rows).float() @ direction.float()) @ self.right.float()
        return out.mul_(self.scale)

    def add_update_(self, weight: torch.Tensor, direction: torch.Tensor, alpha: float) -> None:
        """weight += alpha * scale * (back-projected direction) in the weight's dtype, without a
        full-size temporary for one-sided projectors (addmm_ writes into the weight)."""
        direction = direction.to(weight.dtype)
        a = alpha * self.scale
        if self.sides == ("left",):
            weight.addmm_(self.left.to(weight.dtype), direction, alpha=a)
        elif self.sides == ("right",):
            weight.addmm_(direction, self.right.to(weight.dtype), alpha=a)
        else:
            weight.add_(self.project_back(direction).to(weight.dtype), alpha=a)

    def rotation(self, old_left: torch.Tensor | None, old_right: torch.Tensor | None,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Maps low-rank coordinates in the old basis to the new one: R_new = A R_old B."""
        wide = torch.promote_types((self.left if self.left is not None else self.right).dtype, torch.float32)
        a = self.left.T.to(wide) @ old_left.to(wide) if self.left is not None and old_left is not None else None
        b = old_right.to(wide) @ self.right.T.to(wide) if self.right is not None and old_right is not None else None
        return a, b

    # ------------------------------------------------------------------ persistence and placement
    def state_dict(self) -> dict[str, Any]:
        return {"left": self.left, "right": self.right, "phase": self.phase, "refreshes": self.refreshes,
                "supported": self.supported, "top_singular_value": self.top_singular_value, "stale": self.stale,
                "fill_exhausted": self.fill_exhausted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.left, self.right = state["left"], state["right"]
        self.phase, self.refreshes, self.stale = int(state["phase"]), int(state["refreshes"]), bool(state["stale"])
        self.supported = int(state["supported"])
        self.top_singular_value = float(state["top_singular_value"])
        self.fill_exhausted = bool(state["fill_exhausted"])

    @property
    def device(self) -> torch.device | None:
        basis = self.left if self.left is not None else self.right
        return None if basis is None else basis.device

    def to(self, device: torch.device | str) -> None:
        self.left = self.left.to(device) if self.left is not None else None
        self.right = self.right.to(device) if self.right is not None else None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right) if t is not None)
