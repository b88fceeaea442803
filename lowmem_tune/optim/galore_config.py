"""GaLoreAdamW's configuration: what is not a parameter group's own."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_tune.optim.moments import MIN_8BIT_SIZE
from lowmem_tune.optim.subspace import BASIS_RULES

MOMENT_POLICIES = ("keep", "project", "reset")
APOLLO_VARIANTS = ("apollo", "apollo-mini")
"""Run by ApolloAdamW (apollo.py), GaLoreAdamW's subclass."""
VARIANTS = ("galore", "fira") + APOLLO_VARIANTS


@dataclass(frozen=True)
class GaLoreConfig:
    """How a GaLoreAdamW runs (see galore_adamw.py). `betas`, `eps` and `weight_decay` are the
    param groups' defaults, which a group may override as in torch optimizers; the rest hold for
    every group. `stagger` spreads the SVDs of n matrices evenly over update_proj_gap steps instead
    of putting them all on step 0; `micro_batches` per step is when a sketch is complete."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    bits: int = 32
    moments: str = "keep"
    variant: str = "galore"
    fira_limiter: float = 1.01
    svd: str = "sketch"
    stagger: bool = False
    min_8bit_size: int = MIN_8BIT_SIZE
    micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {self.bits}")
        if self.moments not in MOMENT_POLICIES:
            raise ValueError(f"moments must be one of {MOMENT_POLICIES}, got {self.moments!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant in APOLLO_VARIANTS and self.moments != "keep":
            raise ValueError(f"variant {self.variant} keeps its moments across random projections (moments 'keep'), "
                             f"got {self.moments!r}")
        if self.svd not in BASIS_RULES:
            raise ValueError(f"svd must be one of {BASIS_RULES}, got {self.svd!r}")
