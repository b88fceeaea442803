"""Optimizers and updaters: GaLore, 8-bit GaLore, Fira, and the layerwise engine."""

from lowmem_tune.optim.galore_adamw import GaLoreAdamW
from lowmem_tune.optim.layerwise import GaLoreUpdater
from lowmem_tune.optim.projector import GaLoreProjector, SVDFailure
from lowmem_tune.optim.updater import StandardUpdater, Updater, tensor_bytes

__all__ = ["GaLoreAdamW", "GaLoreProjector", "GaLoreUpdater", "SVDFailure", "StandardUpdater", "Updater",
           "tensor_bytes"]
