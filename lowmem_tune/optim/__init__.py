"""Optimizers and updaters: GaLore, 8-bit GaLore, Fira, APOLLO, the layerwise engine, and the one builder."""

from lowmem_tune.optim.build import LOW_RANK_OPTIMIZERS, OPTIMIZERS, TrainableParameters, build_updater
from lowmem_tune.optim.apollo import ApolloAdamW
from lowmem_tune.optim.galore_adamw import GaLoreAdamW
from lowmem_tune.optim.galore_config import GaLoreConfig
from lowmem_tune.optim.layerwise import GaLoreUpdater
from lowmem_tune.optim.offload import tensor_bytes
from lowmem_tune.optim.projector import GaLoreProjector, SVDFailure
from lowmem_tune.optim.rounding import StochasticRounding
from lowmem_tune.optim.updater import StandardUpdater, Updater

__all__ = ["LOW_RANK_OPTIMIZERS", "OPTIMIZERS", "ApolloAdamW", "GaLoreAdamW", "GaLoreConfig", "GaLoreProjector",
           "GaLoreUpdater", "SVDFailure", "StandardUpdater", "StochasticRounding", "TrainableParameters", "Updater",
           "build_updater", "tensor_bytes"]
