"""Checkpoints: OUTPUT/checkpoints/step-N/ with the model (safetensors) and the trainer state.

A checkpoint is written under a temporary name and renamed into place, so a crash or `kill -9`
mid-write leaves the previous checkpoints intact; leftovers of an interrupted write are ignored and
cleaned up. The trainer state (`trainer_state.pt`) holds only tensors, numbers and containers, so it
loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from lowmem_tune.atomic import atomic_directory

_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


def list_checkpoints(checkpoints_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for entry in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / STATE_FILE).is_file() and (entry / MODEL_FILE).is_file():
            found.append(CheckpointInfo(int(match.group(1)), entry))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(checkpoints_dir: Path) -> CheckpointInfo | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def save_checkpoint(checkpoints_dir: Path, step: int, model: nn.Module, state: dict[str, Any],
                    keep: int, keys: set[str] | None = None) -> Path:
    """Write step-N atomically, then drop all but the newest `keep` checkpoints. `keys`: the
    state_dict entries to hold (an adapter's), None for the whole model."""
    final = checkpoints_dir / f"step-{step}"
    # re-saving a step (a stop right after a periodic save) replaces it without a moment where
    # neither copy is complete
    with atomic_directory(final, replace=True) as tmp:
        if keys is None:
            save_model(model, str(tmp / MODEL_FILE))
        else:
            tensors = model.state_dict()
            save_file({k: tensors[k].detach().contiguous() for k in sorted(keys)}, str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def load_checkpoint(info: CheckpointInfo, model: nn.Module, keys: set[str] | None = None) -> dict[str, Any]:
    """Load weights into `model` in place, onto the device it is on, and return the trainer state
    on the CPU; `keys` as save_checkpoint was given them (the rest of the model stays as loaded).
    Each component moves its own tensors where they belong when it loads its part: moments go to
    their parameter's device, offloaded state stays on the CPU, generator states stay CPU
    ByteTensors (a CPU generator refuses any other)."""
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(info.path / MODEL_FILE), strict=False, device=str(device))
    if keys is not None:
        missing = sorted(keys.intersection(missing))
    if unexpected or missing:
        raise RuntimeError(
            f"checkpoint {info.path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return load_trainer_state(info)


def load_trainer_state(info: CheckpointInfo) -> dict[str, Any]:
    return torch.load(info.path / STATE_FILE, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
