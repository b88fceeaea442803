"""`galore`, `fira`, `apollo` and `apollo-mini`: every weight trainable; the decoder layers' linear
projections train in a low-rank gradient subspace (GaLore, or Fira with the scaled residual) or
scale their raw gradient by Adam's low-rank statistics in a random subspace (APOLLO: per channel;
APOLLO-Mini: rank 1, per tensor), everything else with AdamW. With `strategy.layerwise` (default)
gradients are consumed in backward hooks (see optim.layerwise).
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


class Apollo(GaLore):
    """APOLLO (Zhu et al. 2024): a seeded random projection redrawn every update_proj_gap steps,
    AdamW moments in rank r, the raw gradient scaled per channel (optim/apollo.py)."""

    name = "apollo"
    optimizer = "apollo"


class ApolloMini(GaLore):
    """APOLLO-Mini: APOLLO at rank 1 with one tensor-wise scaling factor."""

    name = "apollo-mini"
    optimizer = "apollo-mini"


__all__ = ["Apollo", "ApolloMini", "Fira", "GaLore", "galore_matrices"]
