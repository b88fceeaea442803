"""`galore` and `fira`: every weight trainable; the decoder layers' linear projections train in a
low-rank gradient subspace (GaLore, or Fira with the scaled residual), everything else with AdamW.
With `strategy.layerwise` (default) gradients are consumed in backward hooks (see optim.layerwise).
"""

from __future__ import annotations

from typing import Any

from lowmem_tune.profile import strategy_knobs
from lowmem_tune.strategies.base import Strategy, galore_matrices


class GaLore(Strategy):
    name = "galore"
    optimizer = "galore"

    n_matrices = 0

    def parameter_groups(self, model):
        matrices, others = super().parameter_groups(model)
        self.n_matrices = len(matrices)
        return matrices, others

    def describe(self) -> dict[str, Any]:
        knobs = {key: getattr(self.cfg, key) for key in strategy_knobs(self.name)}
        return {**knobs, "galore_matrices": self.n_matrices}


class Fira(GaLore):
    """GaLore plus the norm-scaled gradient residual outside the subspace (Chen et al. 2024)."""

    name = "fira"
    optimizer = "fira"


__all__ = ["Fira", "GaLore", "galore_matrices"]
