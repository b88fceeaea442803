"""Parking optimizer state on the CPU while its parameter is out of training (LISA / OwLore layers
outside the sample), bringing it back, and counting its bytes: the one place both optimizers'
states go through."""

from __future__ import annotations

from typing import Any

import torch

ON_CPU = "parked_on_cpu"
"""Key of a parked state: the keys whose tensors lived on the CPU already (torch keeps AdamW's
`step` counter there), which stay there when the state comes back."""


def park(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of `state` with every tensor (and every object with `.to`, such as a projector) on
    the CPU, marked as parked."""
    parked: dict[str, Any] = {ON_CPU: []}
    for key, value in state.items():
        if torch.is_tensor(value):
            if value.device.type == "cpu":
                parked[ON_CPU].append(key)
            value = value.to("cpu", copy=True)
        elif hasattr(value, "to") and getattr(value, "device", None) is not None:
            value.to("cpu")
        parked[key] = value
    return parked


def unpark(parked: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The state `park` was given, its tensors back on `device` (its parameter's)."""
    stay = set(parked[ON_CPU])
    state = {}
    for key, value in parked.items():
        if key == ON_CPU:
            continue
        if torch.is_tensor(value) and key not in stay:
            value = value.to(device)
        elif not torch.is_tensor(value) and hasattr(value, "to") and hasattr(value, "device"):
            value.to(device)
        state[key] = value
    return state


def is_parked(state: dict[str, Any]) -> bool:
    return ON_CPU in state


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts / lists / tuples, and of the objects in them that
    count their own (`nbytes()`: GaLore projectors and sketches)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return obj.nbytes() if callable(getattr(obj, "nbytes", None)) else 0
