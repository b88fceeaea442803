"""Finetuning strategies, by the name a profile gives in `strategy.name`."""

from __future__ import annotations

from lowmem_tune.errors import UserError
from lowmem_tune.profile import Profile
from lowmem_tune.strategies.adamw import AdamW8bit, FullAdamW
from lowmem_tune.strategies.base import Strategy, StrategyContext, trainable_parameters
from lowmem_tune.strategies.galore import Fira, GaLore
from lowmem_tune.strategies.layer_sampling import LISA, OwLore
from lowmem_tune.strategies.welore import WeLore

_REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FullAdamW, AdamW8bit, GaLore, Fira, LISA, OwLore, WeLore)
}


def build_strategy(profile: Profile) -> Strategy:
    name = profile.strategy.name
    if name not in _REGISTRY:
        raise UserError(
            f"strategy {name!r} is unknown (available: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[name](profile)


__all__ = ["Strategy", "StrategyContext", "build_strategy", "trainable_parameters"]
