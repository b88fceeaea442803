"""The one place that builds an `Updater` from a profile: every strategy asks here.

A strategy says which parameters may train and how: `galore` / `fira` / `apollo` / `apollo-mini`
(GaLore-AdamW, or its subclass ApolloAdamW, over the given 2-D matrices, plain AdamW over the
rest, layerwise or not), `adamw` (torch AdamW) or `adamw8bit` (bitsandbytes' AdamW8bit) over all of them — or, for 16-bit weights with stochastic rounding,
the same AdamW (fp32 or bitsandbytes' 8-bit moments) through GaLore-AdamW without projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from lowmem_tune.optim.apollo import ApolloAdamW
from lowmem_tune.optim.galore_adamw import GaLoreAdamW
from lowmem_tune.optim.galore_config import APOLLO_VARIANTS, GaLoreConfig
from lowmem_tune.optim.layerwise import GaLoreUpdater
from lowmem_tune.optim.rounding import StochasticRounding
from lowmem_tune.optim.updater import StandardUpdater, Updater
from lowmem_tune.optim.writer import WeightStore
from lowmem_tune.profile import Profile

LOW_RANK_OPTIMIZERS = ("galore", "fira") + APOLLO_VARIANTS
"""The optimizers that train 2-D matrices through a projection (GaLoreAdamW's variants)."""
OPTIMIZERS = LOW_RANK_OPTIMIZERS + ("adamw", "adamw8bit")


@dataclass
class TrainableParameters:
    """The model's parameters an updater may train, and what it needs to know about them.

    Frozen parameters may be included: they train once they require grad (layer sampling)."""

    matrices: Sequence[nn.Parameter]
    """Through GaLore-AdamW's projection, for the LOW_RANK_OPTIMIZERS."""
    others: Sequence[nn.Parameter]
    """Through AdamW."""
    embeddings: Sequence[nn.Parameter] = ()
    """Through GaLore at strategy.embedding_rank."""
    names: Mapping[nn.Parameter, str] = field(default_factory=dict)
    stores: Mapping[nn.Parameter, WeightStore] = field(default_factory=dict)
    """The matrices whose values live elsewhere (INT8 weights), by gradient handle."""
    modules: Sequence[nn.Module] = ()
    """The model's modules: where layerwise GaLore finds the linears of its matrices, to project
    their gradients in backward."""


def rounds_stochastically(rounding: str, params: Sequence[nn.Parameter]) -> bool:
    """Whether AdamW (`adamw`, `adamw8bit`) writes its updates with stochastic rounding: with
    `strategy.rounding: stochastic` into 16-bit weights; otherwise torch's / bitsandbytes' own."""
    return rounding == "stochastic" and any(p.dtype in (torch.bfloat16, torch.float16) for p in params)


def build_updater(optimizer: str, parameters: TrainableParameters, profile: Profile, fake: bool = False,
                  inform: Callable[[str], None] | None = None,
                  average: Callable[[list[torch.Tensor]], None] | None = None) -> Updater:
    """An updater over `parameters` with `optimizer`, configured by `profile`. `average` (several
    processes) is how GaLore averages its state across them once per step; torch / bitsandbytes
    optimizers run under DistributedDataParallel instead, set up by the training run."""
    t, s = profile.train, profile.strategy
    if optimizer in ("adamw", "adamw8bit"):
        params = [*parameters.matrices, *parameters.others]
        if rounds_stochastically(s.rounding, params):
            # torch's and bitsandbytes' AdamW round each update into a 16-bit weight to nearest, and
            # in bf16 an update below half the weight's ulp is lost (at lr 1e-5, most of them): the
            # same AdamW through our optimizer, no matrix projected, writes them unbiased
            config = GaLoreConfig(betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                                  bits=8 if optimizer == "adamw8bit" else 32, micro_batches=t.gradient_accumulation)
            opt = GaLoreAdamW([{"params": params}], lr=t.lr, config=config, param_names=parameters.names,
                              rounding=StochasticRounding(t.seed), inform=inform, average=average)
            return GaLoreUpdater(opt, t.max_grad_norm, layerwise=False)
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
    groups = [{"params": list(parameters.matrices), "rank": s.rank, **galore}]
    if parameters.embeddings:
        groups.append({"params": list(parameters.embeddings), "rank": s.embedding_rank, **galore})
    if parameters.others:
        groups.append({"params": list(parameters.others)})
    # a random projection costs no SVD to spread over T steps: every matrix redraws at once, as apollo-torch
    config = GaLoreConfig(betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, bits=s.bits, moments=s.moments,
                          variant=optimizer, fira_limiter=s.fira_limiter, svd=s.svd,
                          stagger=optimizer not in APOLLO_VARIANTS, micro_batches=t.gradient_accumulation)
    opt = (ApolloAdamW if optimizer in APOLLO_VARIANTS else GaLoreAdamW)(
        groups, lr=t.lr, config=config, param_names=parameters.names,
        rounding=StochasticRounding(t.seed) if s.rounding == "stochastic" else None, inform=inform,
        stores=parameters.stores, average=average,
    )
    return GaLoreUpdater(opt, t.max_grad_norm, layerwise=s.layerwise, modules=parameters.modules)
