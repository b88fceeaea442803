"""GaLoreAdamW's checkpoint format: everything as plain tensors, numbers and strings, so it loads
with torch.load(weights_only=True) — the projector as `projector.*` entries, not a pickled object."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lowmem_tune.optim.offload import is_parked
from lowmem_tune.optim.projector import GaLoreProjector
from lowmem_tune.optim.writer import RoundingWriter


class GaLoreState(Protocol):
    """What the checkpoint format reads and writes of GaLoreAdamW (which imports this module)."""

    state: Any
    param_groups: list[dict[str, Any]]
    global_step: int
    writer: RoundingWriter | None

    def params(self) -> list[torch.Tensor]: ...

    def param_index(self) -> dict[int, int]: ...

    def new_projector(self, p: torch.Tensor) -> GaLoreProjector: ...


TRANSIENT = ("grad_acc", "full_sq", "micro", "sketch", "basis_taken", "deferred", "low_only", "updated")
"""Per-step state, gone by the end of every step: never in a checkpoint."""


def galore_state_dict(opt: GaLoreState) -> dict[str, Any]:
    """Plain tensors, numbers and strings: the projectors flattened, transient step state left out."""
    index = opt.param_index()
    states = {}
    for p, state in opt.state.items():
        flat = {}
        for key, value in state.items():
            if key in TRANSIENT:
                continue
            if isinstance(value, GaLoreProjector):
                flat.update({f"projector.{k}": v for k, v in value.state_dict().items()})
            else:
                flat[key] = value
        states[index[id(p)]] = flat
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    saved = {"global_step": opt.global_step, "state": states, "param_groups": groups}
    if opt.writer is not None:
        saved["rounding"] = opt.writer.rounding.state_dict()
    return saved


def load_galore_state_dict(opt: GaLoreState, state_dict: dict[str, Any]) -> None:
    """Moments onto their parameter's device; parked state stays on the CPU."""
    params = opt.params()
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)):
        raise ValueError("optimizer state does not match these parameter groups")
    for saved, group in zip(saved_groups, opt.param_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    opt.global_step = int(state_dict["global_step"])
    if opt.writer is not None and "rounding" in state_dict:
        opt.writer.rounding.load_state_dict(state_dict["rounding"])
    opt.state.clear()
    for idx, flat in state_dict["state"].items():
        p = params[int(idx)]
        parked = is_parked(flat)
        state = opt.state[p]
        proj_state = {}
        for key, value in flat.items():
            if isinstance(value, torch.Tensor) and not parked:
                value = value.to(p.device)
            if key.startswith("projector."):
                proj_state[key.split(".", 1)[1]] = value
            else:
                state[key] = value
        if proj_state:
            state["projector"] = opt.new_projector(p)
            state["projector"].load_state_dict(proj_state)
