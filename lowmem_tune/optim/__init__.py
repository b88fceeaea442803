"""Optimizers and updaters: GaLore, 8-bit GaLore, Fira, and the layerwise engine."""

from lowmem_tune.optim.updater import StandardUpdater, Updater, tensor_bytes

__all__ = ["StandardUpdater", "Updater", "tensor_bytes"]
