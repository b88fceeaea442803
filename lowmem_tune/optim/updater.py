"""The contract between the training loop and whatever updates the weights.

The loop owns the learning-rate schedule and the micro-batch loop; an `Updater` owns gradients
and optimizer state. After the last micro-batch's backward of a logical batch the loop calls
`set_lr(lr)` and then `step()`, once. A layerwise updater may have consumed the gradients already
in backward hooks; `step()` is still the single place where the logical step completes.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch


class Updater(Protocol):
    def set_lr(self, lr: float) -> None: ...

    def step(self) -> float:
        """Finish the logical step: clip, update, clear gradients. Returns the global gradient
        norm before clipping."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and containers only: loadable with torch.load(weights_only=True)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, projectors, accumulators)."""
        ...

    def close(self) -> None:
        """Remove hooks; the updater is not used after this."""
        ...


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class StandardUpdater:
    """A torch optimizer stepped once per logical batch after global-norm clipping."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                 max_grad_norm: float | None) -> None:
        self.optimizer = optimizer
        self.params = [p for p in params if p.requires_grad]
        self.max_grad_norm = max_grad_norm

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> float:
        with_grad = [p for p in self.params if p.grad is not None]
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad]) if with_grad else torch.zeros(())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        from torch._subclasses.fake_tensor import FakeTensor

        return 0.0 if isinstance(norm, FakeTensor) else float(norm)  # `plan --verify` has no values

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def state_bytes(self) -> int:
        return tensor_bytes(self.optimizer.state)

    def close(self) -> None:
        pass
