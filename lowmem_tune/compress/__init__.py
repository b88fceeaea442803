"""WeLore compression: rank-reduce a model non-uniformly, save it, merge it back.

`compress_model` does the work in memory (spectra → rank plan → factorization); the commands
`compress` and `merge` are `lowmem_tune.commands.compress`. See `ranks.py` for what the effective rank reduction
(ERR) means and how τ is chosen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from lowmem_tune.compress.lowrank import LowRankLinear, factorize, install_empty, lowrank_modules, merge_lowrank
from lowmem_tune.compress.ranks import (
    MatrixRank,
    RankPlan,
    assumed_ranks,
    assumed_ranks_of,
    decoder_matrices,
    plan_from_ranks,
    select_ranks,
)
from lowmem_tune.compress.spectra import singular_values
from lowmem_tune.compress.storage import (
    compressed_ranks,
    load_compressed,
    record_plan,
    save_compressed,
    save_merged,
)
from lowmem_tune.errors import UserError


def plan_ranks(model: PreTrainedModel, rank_reduction: float, min_ratio: float, cache: Path,
               svd_device: torch.device | None = None, progress: bool = True) -> RankPlan:
    """The rank plan for `model` from its (cached) spectra; the model is not changed."""
    spectra = singular_values(model, cache, svd_device, progress)
    shapes = {name: (mod.out_features, mod.in_features) for name, mod in decoder_matrices(model).items()}
    return select_ranks(spectra, shapes, rank_reduction, min_ratio)


def compress_model(model: PreTrainedModel, rank_reduction: float, min_ratio: float, cache: Path,
                   svd_device: torch.device | None = None, progress: bool = True) -> RankPlan:
    """Replace the LRCs of `model` by LowRankLinear factors in place and record the plan in its config."""
    if lowrank_modules(model):
        raise UserError("the model is already WeLore-compressed; compress the original dense model instead")
    plan = plan_ranks(model, rank_reduction, min_ratio, cache, svd_device, progress)
    factorize(model, plan.lrc_ranks, svd_device, progress)
    record_plan(model, plan)
    return plan


__all__ = [
    "LowRankLinear", "MatrixRank", "RankPlan", "assumed_ranks", "assumed_ranks_of",
    "compress_model", "compressed_ranks", "decoder_matrices", "factorize",
    "install_empty", "load_compressed", "lowrank_modules", "merge_lowrank",
    "plan_from_ranks", "plan_ranks", "record_plan", "save_compressed", "save_merged", "select_ranks",
    "singular_values",
]
