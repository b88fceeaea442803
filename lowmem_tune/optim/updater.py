"""The contract between the training loop and whatever updates the weights.

The loop owns the learning-rate schedule and the micro-batch loop; an `Updater` owns gradients
and optimizer state. After the last micro-batch's backward of a logical batch the loop calls
`set_lr(lr)` and then `step()`, once. A layerwise updater may have consumed the gradients already
in backward hooks; `step()` is still the single place where the logical step completes. `step()`
returns device tensors and never synchronizes: the loop reads them together with the loss in its
one host synchronization of the step, then asks `metrics()` for the host-side facts.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch

from lowmem_tune.optim.offload import park, tensor_bytes, unpark


class Updater(Protocol):
    def set_lr(self, lr: float) -> None: ...

    def step(self) -> dict[str, torch.Tensor]:
        """Finish the logical step: clip, update, clear gradients. Returns 0-d device tensors:
        `grad_norm` (the global norm before clipping) and any other per-step values."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Host-side facts of the last step for metrics.jsonl (called after the loop's sync)."""
        ...

    def release(self, params: Iterable[torch.nn.Parameter], offload: bool = False) -> None:
        """Drop (or park on the CPU) the gradients and state of `params`, which leave training."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and containers only: loadable with torch.load(weights_only=True)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def state_bytes(self) -> int:
        """Bytes held in optimizer state on the device (moments, projectors, accumulators)."""
        ...

    def close(self) -> None:
        """Remove hooks; the updater is not used after this."""
        ...


class StandardUpdater:
    """A torch or bitsandbytes optimizer over every parameter that may train (frozen ones too: a
    LISA / OwLore layer frozen now may be sampled later), stepped once per logical batch after
    global-norm clipping. Both optimizers create state on a parameter's first gradient and skip
    parameters without one, so frozen layers cost nothing until they train; `release` parks or
    drops the state of parameters leaving training, and parked state comes back with the
    parameter's next gradient."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                 max_grad_norm: float | None) -> None:
        self.optimizer = optimizer
        self.params = list(params)
        self.max_grad_norm = max_grad_norm
        self.parked: dict[torch.nn.Parameter, dict[str, Any]] = {}

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> dict[str, torch.Tensor]:
        with_grad = [p for p in self.params if p.grad is not None]
        for param in with_grad:
            if param in self.parked:
                self.optimizer.state[param] = unpark(self.parked.pop(param), param.device)
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad]) if with_grad else torch.zeros(())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def metrics(self) -> dict[str, Any]:
        return {}

    def release(self, params: Iterable[torch.nn.Parameter], offload: bool = False) -> None:
        for param in params:
            param.grad = None
            state = self.optimizer.state.pop(param, None)
            if offload and state:
                self.parked[param] = park(state)

    def state_bytes(self) -> int:
        """Bytes of live optimizer state; parked state is counted by offloaded_bytes."""
        return tensor_bytes(dict(self.optimizer.state))

    def offloaded_bytes(self) -> int:
        return sum(tensor_bytes(parked) for parked in self.parked.values())

    def state_dict(self) -> dict[str, Any]:
        index = {param: i for i, param in enumerate(self.params)}
        return {"optimizer": self.optimizer.state_dict(),
                "parked": {index[p]: state for p, state in self.parked.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.parked = {self.params[int(i)]: parked for i, parked in state["parked"].items()}

    def close(self) -> None:
        pass
