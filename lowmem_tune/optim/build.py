"""The one place that builds an `Updater` from a profile: every strategy asks here.

A strategy says which parameters may train and how: `galore` / `fira` (GaLore-AdamW over the given
2-D matrices, plain AdamW over the rest, layerwise or not), `adamw` (torch AdamW) or `adamw8bit`
(bitsandbytes' AdamW8bit) over all of them.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from lowmem_tune.optim.galore_adamw import GaLoreAdamW
from lowmem_tune.optim.layerwise import GaLoreUpdater
from lowmem_tune.optim.rounding import StochasticRounding
from lowmem_tune.optim.updater import StandardUpdater, Updater
from lowmem_tune.optim.writer import WeightStore
from lowmem_tune.profile import Profile

OPTIMIZERS = ("galore", "fira", "adamw", "adamw8bit")


def build_updater(optimizer: str, matrices: Sequence[nn.Parameter], others: Sequence[nn.Parameter], profile: Profile,
                  names: Mapping[nn.Parameter, str] | None = None, fake: bool = False,
                  inform: Callable[[str], None] | None = None,
                  stores: Mapping[nn.Parameter, WeightStore] | None = None,
                  embeddings: Sequence[nn.Parameter] = (),
                  average: Callable[[list[torch.Tensor]], None] | None = None,
                  modules: Sequence[nn.Module] = ()) -> Updater:
    """An updater over `matrices` (through GaLore, for galore / fira), `embeddings` (through
    GaLore at strategy.embedding_rank) and `others` (AdamW). `stores` holds the matrices whose
    values live elsewhere (INT8 weights, by gradient handle). `average` (several processes) is how
    GaLore averages its state across them once per step; torch / bitsandbytes optimizers run under
    DistributedDataParallel instead, set up by the training run. `modules` (the model's) are where
    layerwise GaLore finds the linears of its matrices, to project their gradients in backward.

    Frozen parameters may be included: they train once they require grad (layer sampling)."""
    t, s = profile.train, profile.strategy
    if optimizer in ("adamw", "adamw8bit"):
        params = [*matrices, *others]
        if optimizer == "adamw":
            # foreach makes one temporary per tensor list; `plan --verify` measures the per-tensor path
            opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                                    foreach=not fake)
        else:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
        return StandardUpdater(opt, params, t.max_grad_norm)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    galore = {"update_proj_gap": s.update_proj_gap, "scale": s.scale, "proj_type": s.proj_type}
    groups = [{"params": list(matrices), "rank": s.rank, **galore}]
    if embeddings:
        groups.append({"params": list(embeddings), "rank": s.embedding_rank, **galore})
    if others:
        groups.append({"params": list(others)})
    opt = GaLoreAdamW(
        groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, bits=s.bits,
        moments=s.moments, variant=optimizer, fira_limiter=s.fira_limiter, stagger=True, param_names=names,
        svd=s.svd, rounding=StochasticRounding(t.seed) if s.rounding == "stochastic" else None, inform=inform,
        micro_batches=t.gradient_accumulation, stores=stores, average=average,
    )
    return GaLoreUpdater(opt, t.max_grad_norm, layerwise=s.layerwise, modules=modules)
