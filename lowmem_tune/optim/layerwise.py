"""`GaLoreUpdater`: drives a `GaLoreAdamW` for the training loop, optionally layerwise.

Layerwise mode registers a `register_post_accumulate_grad_hook` on every parameter of the
optimizer. For a GaLore matrix the hook projects the fresh micro-batch gradient into its low-rank
fp32 accumulator and frees the full gradient (`p.grad = None`) at once, so during backward at most
the gradient being produced is alive, plus the full gradients of (a) matrices with a scheduled
projector refresh at the coming step (staggered phases keep them about n/T per step), (b) Fira
matrices and (c) non-GaLore tensors (embeddings, lm_head, norms), which accumulate as usual.
A matrix without a basis — every matrix at step 0, a layer returning to a LISA/OwLore sample —
first takes one from the micro-batch gradient at hand and is then absorbed like the others, so
step 0 needs no more gradient memory than any other step.

Ordinary mode (layerwise=False) registers hooks too, on GaLore matrices only, that do just that
first part (`GaLoreAdamW.take_initial_basis`): both modes then follow the same rule for where a
basis comes from (see galore_adamw's docstring), and for k > 1 micro-batches they stay equivalent.

The Adam update itself is deferred to `step()`, called once per logical batch after the k-th
micro-batch's backward, when activations are already freed. Deferring costs no gradient memory
(only r-sized accumulators wait) and buys three things the hook-stepping reference lacks:
gradient accumulation works (one optimizer step per logical batch, not per micro-batch), the
clipping norm is known before any weight moves (so clipping is exact), and the trajectory equals
the non-layerwise optimizer's (same code, same order of operations on the same low-rank sums).

Clipping policy and reported norm (see galore_adamw's docstring): `step()` returns, and clips by,
the global norm of the gradient the optimizer consumes — the projected accumulated gradient of a
GaLore matrix, the full accumulated gradient of every other tensor. That is exact for any k. The
norm of the *full* gradient (including what lies outside the subspaces) needs every full gradient,
which layerwise mode does not keep when k > 1 (||sum of micro-batch gradients|| is not a function
of per-micro-batch norms); `full_grad_norm` is therefore reported only when it is exact (k = 1, or
non-layerwise), and is None otherwise.

API for layer-sampling strategies (LISA / OwLore): build `GaLoreAdamW` on an explicit list of
groups (GaLore matrices of every candidate layer + other trainable tensors), wrap it here with
layerwise=True; hooks cover every candidate, state appears on a parameter's first gradient, and
`release(params, offload=False)` drops (or parks on the CPU) the gradients, moments, accumulators
and projectors of layers leaving the active set; a returning matrix takes a new basis from its first
micro-batch gradient. State bytes therefore depend only on the active layers.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from lowmem_tune.optim.galore_adamw import GaLoreAdamW
from lowmem_tune.optim.projector import is_fake


class GaLoreUpdater:
    """The `Updater` for GaLore / Fira: set_lr, then step() once per logical batch."""

    def __init__(self, optimizer: GaLoreAdamW, max_grad_norm: float | None, layerwise: bool = True) -> None:
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.layerwise = layerwise
        self.full_grad_norm: float | None = None
        self._hooks = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if layerwise:
                    self._hooks.append(_hook_even_if_frozen(p, optimizer.absorb_grad))
                elif optimizer.is_galore(p):
                    self._hooks.append(_hook_even_if_frozen(p, optimizer.take_initial_basis))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> float:
        consumed, full = self.optimizer.step_clipped(self.max_grad_norm)
        if is_fake(consumed):
            self.full_grad_norm = None
            return 0.0
        self.full_grad_norm = float(full) if full is not None else None
        return float(consumed)

    def release(self, params: Iterable[torch.nn.Parameter], offload: bool = False) -> None:
        self.optimizer.release(params, offload=offload)

    def metrics(self) -> dict[str, Any]:
        return {"projectors_refreshed": self.optimizer.refreshed_last_step,
                "next_refresh_in": self.optimizer.next_refresh_in(),
                "full_grad_norm": self.full_grad_norm}

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def state_bytes(self) -> int:
        return self.optimizer.state_bytes()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _hook_even_if_frozen(p: torch.Tensor, hook) -> Any:
    """torch refuses hooks on tensors without requires_grad; a layer-sampling strategy freezes
    candidates that it unfreezes later, so register with requires_grad on, then restore it."""
    frozen = not p.requires_grad
    if frozen:
        p.requires_grad_(True)
    handle = p.register_post_accumulate_grad_hook(hook)
    if frozen:
        p.requires_grad_(False)
    return handle
