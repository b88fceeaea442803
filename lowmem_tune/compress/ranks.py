"""WeLore rank selection: which decoder matrices become low-rank components, and at which rank.

Definitions (used everywhere in lowmem-tune):

- The decoder matrices are the weights of every nn.Linear inside the decoder layers (q, k, v, o,
  gate, up, down for Llama). A matrix W (out×in) has full rank r = min(out, in).
- Its normalized spectrum is (σ_j − σ_min) / (σ_max − σ_min) over its singular values σ.
- A threshold τ keeps the directions whose normalized value is ≥ τ (at least one): k(τ) of r.
- The matrix is a low-rank component (LRC) when its dropped share 1 − k/r exceeds `min_ratio`;
  otherwise it is an N-LRC and stays dense at full rank.
- The effective rank reduction is ERR = Σ (r − k_eff) / Σ r over all decoder matrices, where
  k_eff = k for an LRC and k_eff = r for an N-LRC.

Selection, for a requested ERR target T:
1. τ is the smallest threshold with ERR(τ) ≥ T, found by bisection over the sorted normalized
   values (ERR only changes there, and it never decreases as τ grows). τ decides which matrices are
   LRCs.
2. A matrix turning LRC removes more than `min_ratio` of its rank at once, so on small models ERR
   jumps past T. So the LRC set is then fixed and a second threshold τ_rank, applied to the LRCs
   alone, sets their ranks: the smallest τ_rank whose ERR is ≥ T (bisection again). Each LRC keeps
   dropping more than `min_ratio`. Two LRC sets are tried — the one at τ (giving back rank, τ_rank
   ≤ τ) and the one just below τ (taking more from fewer matrices, τ_rank ≥ τ) — and the one whose
   ERR is closer to T wins. On a 7B model τ_rank ≈ τ; on a 2-layer test model this is what makes
   ERR land within a fraction of a point of the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from lowmem_tune.errors import UserError
from lowmem_tune.layers import build_empty_model, decoder_layers


@dataclass(frozen=True)
class MatrixRank:
    name: str
    out_features: int
    in_features: int
    rank: int
    """Kept rank: k for an LRC, the full rank for an N-LRC."""
    lrc: bool

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def dropped(self) -> float:
        return 1.0 - self.rank / self.full_rank

    @property
    def parameters(self) -> int:
        """Weight elements after compression (bias not included)."""
        if self.lrc:
            return self.rank * (self.out_features + self.in_features)
        return self.out_features * self.in_features


@dataclass(frozen=True)
class RankPlan:
    matrices: list[MatrixRank]
    target: float
    min_ratio: float
    tau: float | None
    """The classification threshold (None for `assumed_ranks`, which has no spectra)."""
    tau_rank: float | None
    source: str
    """"spectra" (measured singular values) or "assumed" (architecture-only heuristic)."""

    @property
    def achieved(self) -> float:
        """The effective rank reduction (ERR) this plan gives."""
        total = sum(m.full_rank for m in self.matrices)
        return sum(m.full_rank - m.rank for m in self.matrices) / total

    @property
    def lrc_ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.matrices if m.lrc}

    @property
    def lrc_count(self) -> int:
        return sum(m.lrc for m in self.matrices)

    @property
    def nlrc_count(self) -> int:
        return len(self.matrices) - self.lrc_count

    @property
    def removed_parameters(self) -> int:
        """Weight elements the factorization saves over the dense decoder matrices."""
        return sum(m.out_features * m.in_features - m.parameters for m in self.matrices)

    @property
    def factor_parameters(self) -> int:
        """Elements of the LRC factors: what LRC-only training trains, besides the norms."""
        return sum(m.parameters for m in self.matrices if m.lrc)

    def summary(self) -> dict[str, Any]:
        dense = sum(m.out_features * m.in_features for m in self.matrices)
        return {
            "source": self.source,
            "rank_reduction_target": self.target,
            "rank_reduction_achieved": round(self.achieved, 6),
            "min_ratio": self.min_ratio,
            "tau": self.tau,
            "tau_rank": self.tau_rank,
            "lrc": self.lrc_count,
            "n_lrc": self.nlrc_count,
            "decoder_parameter_reduction": round(self.removed_parameters / dense, 6),
            "factor_parameters": self.factor_parameters,
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary plus the per-matrix table (what welore.json and strategy.json hold)."""
        rows = [{**asdict(m), "full_rank": m.full_rank, "dropped": round(m.dropped, 6)} for m in self.matrices]
        return {**self.summary(), "matrices": rows}


def decoder_matrices(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, by its full dotted name in `model`."""
    inside = {id(mod) for layer in decoder_layers(model) for mod in layer.modules()}
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and id(mod) in inside}


def normalized_spectrum(singular_values: torch.Tensor) -> np.ndarray:
    """Min–max normalized singular values, ascending. A flat spectrum (no spread) is all ones:
    no direction is weaker than another, so none is dropped before the others."""
    s = np.sort(singular_values.detach().double().cpu().numpy())
    spread = s[-1] - s[0]
    if not spread > 1e-7 * max(abs(s[-1]), 1e-30):
        return np.ones_like(s)
    return (s - s[0]) / spread


def _lrc_cap(full_rank: int, min_ratio: float) -> int:
    """The largest rank k with 1 − k/r > min_ratio (an LRC never keeps more)."""
    return max(1, math.ceil(full_rank * (1.0 - min_ratio) - 1e-9) - 1)


class _Spectra:
    """The normalized spectra of all decoder matrices, with ERR as a function of thresholds."""

    def __init__(self, spectra: list[np.ndarray], min_ratio: float) -> None:
        self.ascending = spectra
        self.full = np.array([len(s) for s in spectra])
        self.total = int(self.full.sum())
        self.caps = np.array([_lrc_cap(int(r), min_ratio) for r in self.full])

    def kept(self, tau: float) -> np.ndarray:
        counts = [len(s) - np.searchsorted(s, tau, side="left") for s in self.ascending]
        return np.maximum(1, np.array(counts))

    def err(self, kept: np.ndarray) -> float:
        return float((self.full - kept).sum()) / self.total

    def classified(self, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """(LRC mask, effective kept ranks) at threshold tau."""
        kept = self.kept(tau)
        lrc = kept <= self.caps
        return lrc, np.where(lrc, kept, self.full)

    def lrc_kept(self, lrc: np.ndarray, tau_rank: float) -> np.ndarray:
        return np.where(lrc, np.minimum(self.kept(tau_rank), self.caps), self.full)


def _smallest_reaching(candidates: np.ndarray, err_at, target: float) -> int:
    """Index of the smallest candidate threshold whose ERR is ≥ target (ERR is non-decreasing)."""
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if err_at(candidates[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def select_ranks(singular_values: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                 target: float, min_ratio: float) -> RankPlan:
    """Choose LRCs and their ranks so that ERR is the smallest reachable value ≥ `target` (module doc)."""
    names = list(shapes)
    spectra = _Spectra([normalized_spectrum(singular_values[n]) for n in names], min_ratio)
    candidates = np.unique(np.concatenate(spectra.ascending))
    most = spectra.err(spectra.classified(float(candidates[-1]))[1])
    if most < target:
        raise UserError(
            f"rank_reduction {target:.3f} is out of reach for this model with min_ratio {min_ratio}: "
            f"at most {most:.3f} (lower the reduction or min_ratio)"
        )
    i = _smallest_reaching(candidates, lambda t: spectra.err(spectra.classified(float(t))[1]), target)
    options = [_fit_ranks(spectra, candidates, float(candidates[i]), target)]
    if i > 0:  # the LRC set just below τ, taking more rank from its members instead
        options.append(_fit_ranks(spectra, candidates, float(candidates[i - 1]), target))
    tau, tau_rank, lrc, kept = min((o for o in options if o is not None),
                                   key=lambda o: spectra.err(o[3]))
    matrices = [MatrixRank(n, shapes[n][0], shapes[n][1], int(k), bool(is_lrc))
                for n, k, is_lrc in zip(names, kept, lrc)]
    return RankPlan(matrices, target, min_ratio, tau, tau_rank, "spectra")


def _fit_ranks(spectra: _Spectra, candidates: np.ndarray, tau: float, target: float):
    """With the LRC set of threshold `tau` fixed, the LRC-only threshold τ_rank giving the smallest
    ERR ≥ target: (tau, tau_rank, lrc mask, kept ranks), or None when this set cannot reach it."""
    lrc, _ = spectra.classified(tau)
    err_at = lambda t: spectra.err(spectra.lrc_kept(lrc, float(t)))  # noqa: E731
    if not lrc.any() or err_at(candidates[-1]) < target:
        return None
    tau_rank = float(candidates[_smallest_reaching(candidates, err_at, target)])
    return tau, tau_rank, lrc, spectra.lrc_kept(lrc, tau_rank)


# ----------------------------------------------------------------------------- without weights

ASSUMED_ORDER = ("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "v_proj", "down_proj")
"""Projections in the order they are assumed to compress: WeLore (and earlier spectral studies of
LLaMA-2) find q, k, o and gate heavy-tailed and low-rank, and v, up, down close to full rank."""
ASSUMED_MAX_DROP = 0.9
"""No assumed LRC drops more than this share of its rank: a larger reduction recruits more matrices."""


def assumed_ranks(config, rank_reduction: float, min_ratio: float = 0.5) -> RankPlan:
    """The ranks WeLore is expected to choose for an architecture whose weights we do not have.

    Spectra of a random-init model say nothing (random matrices are full rank by construction), so
    this encodes the published structure instead. Projection types are recruited as LRCs, all layers
    at once, in the order of `ASSUMED_ORDER` until they can supply the requested ERR while dropping
    at most `ASSUMED_MAX_DROP` of their rank; every LRC drops the same share. If that share would
    not exceed `min_ratio` (small targets), the last type is recruited edge layers first (early and
    late layers are the more low-rank ones in WeLore's layer-wise analysis) until it would. For
    LLaMA-2-7B at ERR 0.5 this gives q, k, o and gate as LRCs keeping 12.5% of their rank, and v,
    up, down dense — the split the WeLore paper reports.
    """
    return assumed_ranks_of(build_empty_model(config), rank_reduction, min_ratio)


def assumed_ranks_of(model: nn.Module, rank_reduction: float, min_ratio: float = 0.5) -> RankPlan:
    """`assumed_ranks` for a model already built (meta or fake tensors: only shapes are read)."""
    layers = decoder_layers(model)
    linears = decoder_matrices(model)
    shapes = {name: (mod.out_features, mod.in_features) for name, mod in linears.items()}
    full = {name: min(shape) for name, shape in shapes.items()}
    layer_of = {name: i for i, layer in enumerate(layers) for name, mod in linears.items()
                if any(mod is m for m in layer.modules())}
    middle = (len(layers) - 1) / 2
    need = rank_reduction * sum(full.values())
    drop = lambda names: need / max(1, sum(full[n] for n in names))  # noqa: E731

    kinds = list(ASSUMED_ORDER) + sorted({n.rsplit(".", 1)[-1] for n in shapes} - set(ASSUMED_ORDER))
    recruited: list[str] = []
    for kind in kinds:
        previous = list(recruited)
        group = sorted((n for n in shapes if n.rsplit(".", 1)[-1] == kind),
                       key=lambda n: (-abs(layer_of[n] - middle), layer_of[n]))
        recruited += group
        if drop(recruited) <= ASSUMED_MAX_DROP:
            if drop(recruited) <= min_ratio:  # too many matrices: take the last type's edge layers only
                recruited = previous
                for name in group:
                    recruited.append(name)
                    if drop(recruited) <= ASSUMED_MAX_DROP:
                        break
            break
    share = min(drop(recruited), 1.0)
    lrc = {n: min(_lrc_cap(full[n], min_ratio), max(1, round(full[n] * (1 - share)))) for n in recruited}
    matrices = [MatrixRank(n, *shapes[n], lrc.get(n, full[n]), n in lrc) for n in shapes]
    return RankPlan(matrices, rank_reduction, min_ratio, None, None, "assumed")


def plan_from_ranks(model: nn.Module, lrc_ranks: dict[str, int], summary: dict[str, Any]) -> RankPlan:
    """Rebuild a plan from a compressed model's recorded ranks (its config's `welore` entry)."""
    matrices = []
    for name, mod in _decoder_projections(model):
        rank = lrc_ranks.get(name)
        matrices.append(MatrixRank(name, mod.out_features, mod.in_features,
                                   rank if rank is not None else min(mod.out_features, mod.in_features),
                                   rank is not None))
    return RankPlan(matrices, float(summary.get("rank_reduction_target", 0.0)),
                    float(summary.get("min_ratio", 0.5)), summary.get("tau"), summary.get("tau_rank"),
                    summary.get("source", "spectra"))


def _decoder_projections(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Decoder projections whether dense or already factorized (anything with in/out features)."""
    inside = {id(mod) for layer in decoder_layers(model) for mod in layer.modules()}
    for name, mod in model.named_modules():
        if id(mod) in inside and hasattr(mod, "in_features") and hasattr(mod, "out_features") \
                and not any(True for _ in mod.children()):
            yield name, mod
