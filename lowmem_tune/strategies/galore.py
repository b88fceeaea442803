"""`galore` and `fira`: every weight trainable; the decoder layers' linear projections train in a
low-rank gradient subspace (GaLore, or Fira with the scaled residual), everything else with AdamW.
With `strategy.layerwise` (default) gradients are consumed in backward hooks (see optim.layerwise).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowmem_tune.modeling import decoder_layers, layer_linears
from lowmem_tune.optim.galore_adamw import GaLoreAdamW
from lowmem_tune.optim.layerwise import GaLoreUpdater
from lowmem_tune.optim.updater import Updater
from lowmem_tune.strategies.base import Strategy, StrategyContext, trainable_parameters


def galore_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights of the nn.Linear projections inside the decoder layers."""
    return [linear.weight for layer in decoder_layers(model) for linear in layer_linears(layer).values()
            if linear.weight.requires_grad]


class GaLore(Strategy):
    name = "galore"
    variant = "galore"

    updater: GaLoreUpdater | None = None
    n_matrices = 0

    def build_updater(self, model: nn.Module, ctx: StrategyContext) -> Updater:
        t, s = self.profile.train, self.cfg
        matrices = galore_matrices(model)
        chosen = {id(p) for p in matrices}
        others = [p for p in trainable_parameters(model) if id(p) not in chosen]
        names = {p: name for name, p in model.named_parameters()}
        groups = [{"params": matrices, "rank": s.rank, "update_proj_gap": s.update_proj_gap, "scale": s.scale,
                   "proj_type": s.proj_type, "svd": s.svd}]
        if others:
            groups.append({"params": others})
        optimizer = GaLoreAdamW(
            groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, bits=s.bits,
            moments=s.moments, variant=self.variant, fira_limiter=s.fira_limiter, stagger=True, param_names=names,
        )
        self.n_matrices = len(matrices)
        self.updater = GaLoreUpdater(optimizer, t.max_grad_norm, layerwise=s.layerwise)
        return self.updater

    def describe(self) -> dict[str, Any]:
        s = self.cfg
        facts = {"name": self.name, "rank": s.rank, "update_proj_gap": s.update_proj_gap, "scale": s.scale,
                 "proj_type": s.proj_type, "bits": s.bits, "layerwise": s.layerwise, "moments": s.moments,
                 "svd": s.svd, "galore_matrices": self.n_matrices}
        if self.variant == "fira":
            facts["fira_limiter"] = s.fira_limiter
        return facts

    def step_metrics(self) -> dict[str, Any]:
        return self.updater.metrics() if self.updater is not None else {}


class Fira(GaLore):
    """GaLore plus the norm-scaled gradient residual outside the subspace (Chen et al. 2024)."""

    name = "fira"
    variant = "fira"
