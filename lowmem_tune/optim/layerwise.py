"""`GaLoreUpdater`: drives a `GaLoreAdamW` for the training loop, optionally layerwise.

Layerwise mode registers a `register_post_accumulate_grad_hook` on every parameter of the
optimizer, and has the GaLore linears between their refreshes take their low-rank gradient in
backward without a full one (`projected_grad.py`; no hook runs for those). Otherwise, for a
GaLore matrix the hook consumes the fresh micro-batch gradient (into its sketch at a step where
it takes a basis, else into its low-rank fp32 accumulator) and frees it at once,
so during backward at most the gradient being produced is alive, plus the full gradients of Fira
matrices, of matrices taking an exact-SVD basis (`svd: exact` / `randomized`), and of non-GaLore
tensors (embeddings, lm_head, norms), which accumulate as usual. Ordinary mode (layerwise=False)
keeps every gradient until the step; its hooks only feed what the basis rule needs per micro-batch
(the sketch, or under `svd: first_micro_batch` the first basis), exactly as layerwise mode does. Both modes follow the same rule
for where a basis comes from (see subspace.py), so for k > 1 micro-batches they stay equivalent.

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
of per-micro-batch norms) and does not form at all for matrices projected in backward;
`full_grad_norm` is therefore reported only when it is exact (non-layerwise, or k = 1 at a step
where every GaLore matrix formed its gradient).

Layer sampling (LISA / OwLore): the optimizer is built over every candidate layer, frozen or not;
hooks cover every candidate (registered with requires_grad switched on for the moment, since torch
refuses hooks on frozen tensors), state appears on a parameter's first gradient, and `release`
drops (or parks on the CPU) the state of layers leaving the sample. State bytes therefore depend
only on the active layers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from lowmem_tune.optim.galore_adamw import GaLoreAdamW
from lowmem_tune.optim.projected_grad import ProjectedGradients


class GaLoreUpdater:
    """The `Updater` for GaLore / Fira: set_lr, then step() once per logical batch."""

    def __init__(self, optimizer: GaLoreAdamW, max_grad_norm: float | None, layerwise: bool = True,
                 modules: Iterable[nn.Module] = ()) -> None:
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.layerwise = layerwise
        # layerwise, the linears of `modules` whose weights are GaLore matrices project in backward
        self._projected = ProjectedGradients(optimizer, modules if layerwise else ())
        self._hooks = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if layerwise:
                    self._hooks.append(_hook_even_if_frozen(p, optimizer.absorb_grad))
                elif optimizer.is_galore(p) and optimizer.rule == "first_micro_batch":
                    self._hooks.append(_hook_even_if_frozen(p, optimizer.take_initial_basis))
                elif optimizer.is_galore(p) and optimizer.rule == "sketch":
                    self._hooks.append(_hook_even_if_frozen(p, _sketch_hook(optimizer, p), accumulated=False))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> dict[str, torch.Tensor]:
        consumed, full = self.optimizer.step_clipped(self.max_grad_norm)
        return {"grad_norm": consumed} if full is None else {"grad_norm": consumed, "full_grad_norm": full}

    def release(self, params: Iterable[torch.nn.Parameter], offload: bool = False) -> None:
        self.optimizer.release(params, offload=offload)

    def metrics(self) -> dict[str, Any]:
        return {"projectors_refreshed": self.optimizer.refreshed_last_step,
                "next_refresh_in": self.optimizer.next_refresh_in(),
                "refresh_s": self.optimizer.refresh_timer.take()}

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def state_bytes(self) -> int:
        return self.optimizer.state_bytes()

    def close(self) -> None:
        self._projected.close()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _sketch_hook(optimizer: GaLoreAdamW, p: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A gradient hook (it sees each micro-batch's gradient before it is added to p.grad)."""
    def hook(grad: torch.Tensor) -> None:
        optimizer.sketch_grad(p, grad)

    return hook


def _hook_even_if_frozen(p: torch.Tensor, hook: Callable[[torch.Tensor], None], accumulated: bool = True) -> Any:
    """A post-accumulate-grad hook (or, with accumulated=False, a gradient hook). torch refuses
    hooks on tensors without requires_grad; a layer-sampling strategy freezes candidates that it
    unfreezes later, so register with requires_grad on, then restore it."""
    frozen = not p.requires_grad
    if frozen:
        p.requires_grad_(True)
    handle = p.register_post_accumulate_grad_hook(hook) if accumulated else p.register_hook(hook)
    if frozen:
        p.requires_grad_(False)
    return handle
