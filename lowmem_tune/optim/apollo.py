"""APOLLO and APOLLO-Mini (Zhu et al. 2024, arXiv 2412.05270): AdamW's moments in a random
low-rank space, used only to scale the raw gradient.

For a matrix W (m x n) with gradient G, every `update_proj_gap` steps a new random projection is
drawn (no SVD): P (m x r, left) or Q (r x n, right, the side `std` projects: the smaller
dimension), Gaussian with variance 1/r. Each step:
- R = Pᵀ G (r x n) or G Qᵀ (m x r); Adam's moments run on R and give the normalized update N;
- s = ||N|| / ||R|| per channel — per column of R (left) or per row (right), which are the
  columns or rows of G — for APOLLO, or one ratio for the whole tensor for APOLLO-Mini (rank 1);
- the update is scale · s ⊙ G, kept within gamma times the last step's norm by Fira's norm-growth
  limiter (fira.py: the same limiter, on the scaled gradient); decoupled weight decay after it,
  written a block of rows at a time (stochastic rounding into 16-bit weights, or an INT8 store).
The moments are kept across new projections, as apollo-torch does. The state per matrix is the
r-sized moments, the projection (r·min(m, n) values in the weights' dtype) and one norm.

`ApolloAdamW` is GaLoreAdamW with these matrices (its other parameters take AdamW as there). The
update needs each matrix's whole gradient G (s depends on the batch's R = Pᵀ G), so G accumulates
in p.grad over the step's micro-batches; layerwise, the matrix is updated in its hook at the last
micro-batch (after averaging G across processes) and G is freed there, so with one micro-batch per
step only the gradients in flight are alive. The global clipping norm is not known that early, so
APOLLO matrices are never clipped, in either mode (both take the same steps): their update's size
is Adam's, which a clipping factor c changes only through the moments (s ⊙ G is otherwise
invariant to c), and the norm-growth limiter bounds it. The clipping norm includes their ||G|| and
clips every other tensor.

Matches apollo-torch 1.0.3's `APOLLOAdamW` on the same gradients and projections
(tests/test_optim_apollo.py), except:
- `scale` multiplies the update (as GaLore's does); apollo-torch multiplies by sqrt(scale), so its
  APOLLO-Mini scale 128 is our sqrt(128);
- the projection's seed comes from the global step and the matrix (`GaLoreAdamW._seed`), so every
  process of a multi-GPU run draws the same one without a broadcast, and a resumed, layerwise or
  LISA / OwLore run the same one as an uninterrupted one; apollo-torch chains a seed per parameter;
- a channel with ||R|| = 0 gets s = 0 (apollo-torch: ||N|| / 1e-8) and the limiter has no 1e-8
  beside the last norm.
The limiter acts, as apollo-torch's, on the norm of s ⊙ G before Adam's bias correction
sqrt(1 - b2^t) / (1 - b1^t), so the update itself may grow by gamma times the correction's growth.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem_tune.optim.fira import channel_ratio, limit_growth, projected_dim
from lowmem_tune.optim.galore_adamw import GaLoreAdamW
from lowmem_tune.optim.galore_config import APOLLO_VARIANTS, GaLoreConfig
from lowmem_tune.optim.moments import bias_correction, storage_of
from lowmem_tune.optim.norms import squared_norm
from lowmem_tune.optim.projector import GaLoreProjector
from lowmem_tune.optim.subspace import gaussian
from lowmem_tune.optim.writer import RoundingWriter, WeightStore, row_blocks


class RandomProjector(GaLoreProjector):
    """A GaLore projector whose basis is a seeded Gaussian matrix, redrawn on schedule (`due`)."""

    def __init__(self, shape: tuple[int, int], rank: int, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std", phase: int = 0, name: str = "") -> None:
        # apollo-torch takes its channels along the larger dimension whatever the projected side, which
        # works (and is what the paper does) only for std's: the smaller side projected
        if proj_type != "std":
            raise ValueError(f"APOLLO projects the smaller side (proj_type std), got {proj_type!r}")
        super().__init__(shape, rank, update_proj_gap, scale, proj_type, phase, name)
        self.seed = -1
        """The seed the projection held was drawn from (-1: none yet)."""

    def redraw(self, seed: int, like: torch.Tensor, dtype: torch.dtype) -> None:
        """A new projection from `seed`, on `like`'s device, entries N(0, 1/r) (drawn in float32,
        divided, then stored in `dtype`, as apollo-torch does), in the shape apollo-torch draws."""
        m, n = self.shape
        left = self.sides == ("left",)
        basis = gaussian((m, self.rank) if left else (self.rank, n), seed, like.new_empty((), dtype=torch.float32))
        basis = (basis / math.sqrt(self.rank)).to(dtype)
        self.left, self.right = (basis, None) if left else (None, basis)
        self.seed, self.supported, self.stale = seed, self.rank, False
        self.refreshes += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seed = int(state["seed"])


class ApolloAdamW(GaLoreAdamW):
    """GaLoreAdamW whose GaLore groups' matrices take APOLLO steps (variant apollo or apollo-mini)."""

    def __init__(self, params: Any, lr: float = 1e-3, config: GaLoreConfig = GaLoreConfig(variant="apollo"),
                 **kwargs: Any) -> None:
        if config.variant not in APOLLO_VARIANTS:
            raise ValueError(f"ApolloAdamW runs variants {APOLLO_VARIANTS}, got {config.variant!r}")
        super().__init__(params, lr, config, **kwargs)
        self.rule = "random"  # no SVD rule applies

    def new_projector(self, p: torch.Tensor) -> RandomProjector:
        group = self._group[id(p)]
        return RandomProjector(tuple(p.shape), group["rank"], group["update_proj_gap"], group.get("scale", 1.0),
                               group.get("proj_type", "std"), self._phase[id(p)], self.name_of(p))

    @torch.no_grad()
    def absorb_grad(self, p: torch.Tensor) -> None:
        """Layerwise: at the step's last micro-batch p.grad is the batch's gradient; average it
        across processes, update the matrix and free it."""
        if not self.is_galore(p) or p.grad is None:
            super().absorb_grad(p)
            return
        state = self._state(p)
        state["micro"] = state.get("micro", 0) + 1
        if state["micro"] < self.config.micro_batches:
            return
        if self.average is not None:
            self.average([p.grad])
        del state["micro"]
        state["full_sq"], state["updated"] = squared_norm(p.grad), True
        self._update(p, self._group[id(p)], state)

    def _steps_itself(self, p: torch.Tensor, group: dict[str, Any], consumed_sq: list[torch.Tensor],
                      full_sq: list[torch.Tensor]) -> bool:
        if not self.is_galore(p):
            return False
        state = self.state.get(p)
        if state and state.pop("updated", False):  # in its hook
            consumed_sq.append(state.pop("full_sq"))
            full_sq.append(consumed_sq[-1])
        if p.grad is not None:
            consumed_sq.append(squared_norm(p.grad))
            full_sq.append(consumed_sq[-1])
            state = self._state(p)
            state.pop("micro", None)
            self._update(p, group, state)
        return True

    def _update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """A matrix's whole step from p.grad, a new projection first when one is due; frees p.grad."""
        proj: RandomProjector = state["projector"]
        if proj.due(self.global_step):  # moments kept, as apollo-torch does
            with self.refresh_timer.section(p.device):
                proj.redraw(self._seed(p), p.grad, p.dtype)
            self._refreshed += 1
        self._ensure_moments(p, state)
        apollo_step(p, group, state, p.grad, self.writer, self.config.fira_limiter,
                    self.config.variant == "apollo-mini", self._stores.get(id(p)))
        p.grad = None


def apollo_step(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor,
                writer: RoundingWriter | None, limiter: float, tensorwise: bool,
                store: WeightStore | None = None) -> None:
    """One APOLLO update of matrix `p` from its gradient `grad` (any dtype)."""
    lr, wd = group["lr"], group["weight_decay"]
    proj: RandomProjector = state["projector"]
    wide = torch.promote_types(grad.dtype, torch.float32)
    low = proj.project(grad).to(wide)
    direction = storage_of(state).direction(state, low, group["betas"], group["eps"])
    ratio = channel_ratio(direction, low, None if tensorwise else projected_dim(proj.sides))
    per_row = ratio.ndim == 2 and ratio.shape[0] > 1  # m x 1: a factor per row of G

    def scaled_rows(start: int, rows: int) -> torch.Tensor:
        """Rows start .. start + rows of s ⊙ G in float32 (a block: no full-size float32 copy)."""
        factor = ratio.narrow(0, start, rows) if per_row else ratio
        return grad.narrow(0, start, rows).to(wide, copy=True).mul_(factor)  # a copy: G is read twice

    # the limiter compares norms before Adam's bias correction (apollo-torch's scaling factor has none)
    squared = sum(scaled_rows(start, rows).square().sum() for start, rows in row_blocks(grad))
    corrected = bias_correction(state["step"], group["betas"])
    factor, state["limiter_prev"] = limit_growth(squared.sqrt() / corrected, state.get("limiter_prev"), limiter)
    factor = factor * proj.scale

    def update(start: int, rows: int) -> torch.Tensor:
        return scaled_rows(start, rows).mul_(factor)

    if store is not None:
        store.apply_update(update, lr, wd, writer.rounding if writer is not None else None)
        return
    if writer is not None and writer.applies_to(p):
        writer.apply(p, update, lr, wd)
        return
    for start, rows in row_blocks(p):
        p.narrow(0, start, rows).add_(update(start, rows).to(p.dtype), alpha=-lr)
    if wd:
        p.add_(p, alpha=-lr * wd)
