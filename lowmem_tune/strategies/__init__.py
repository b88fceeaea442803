"""Finetuning strategies, by the name a profile gives in `strategy.name` (profile.STRATEGY_NAMES)."""

from __future__ import annotations

from lowmem_tune.profile import Profile
from lowmem_tune.strategies.adamw import AdamW8bit, FullAdamW
from lowmem_tune.strategies.adapters import DoRA, LoRA, QLoRA
from lowmem_tune.strategies.base import Strategy, StrategyContext, trainable_parameters
from lowmem_tune.strategies.galore import Apollo, ApolloMini, Fira, GaLore
from lowmem_tune.strategies.layer_sampling import LISA, OwLore
from lowmem_tune.strategies.welore import WeLore

REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FullAdamW, AdamW8bit, GaLore, Fira, Apollo, ApolloMini, LISA, OwLore, WeLore, LoRA, QLoRA,
                              DoRA)
}


def build_strategy(profile: Profile) -> Strategy:
    """The strategy a profile names (validated against STRATEGY_NAMES when it was loaded)."""
    return REGISTRY[profile.strategy.name](profile)


__all__ = ["REGISTRY", "Strategy", "StrategyContext", "build_strategy", "trainable_parameters"]
