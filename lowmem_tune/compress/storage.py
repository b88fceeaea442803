"""Compressed model directories: save, load back, merge into a plain dense model.

A compressed directory is a normal `save_pretrained` folder (config.json, safetensors) whose
config.json carries a `welore` entry: the rank of every LRC (`ranks`) and how they were chosen.
The LRC weights are stored as `<projection>.left` (out×k) and `<projection>.right` (k×in).
`welore.json` beside it holds the per-matrix table (rank kept, LRC / N-LRC).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lowmem_tune.atomic import write_json_atomic
from lowmem_tune.compress.lowrank import compressed_state_dict, install_empty, merge_lowrank
from lowmem_tune.compress.ranks import RankPlan
from lowmem_tune.errors import UserError
from lowmem_tune.quantize import int8_layers

CONFIG_KEY = "welore"
TABLE_FILE = "welore.json"

def compressed_ranks(config: PretrainedConfig) -> dict[str, int] | None:
    """The recorded LRC ranks of a compressed model's config, or None for a dense model."""
    entry = getattr(config, CONFIG_KEY, None)
    if not isinstance(entry, dict) or not isinstance(entry.get("ranks"), dict):
        return None
    return {str(k): int(v) for k, v in entry["ranks"].items()}


def record_plan(model: PreTrainedModel, plan: RankPlan) -> None:
    """Write the plan into the model's config, so save_pretrained carries it."""
    setattr(model.config, CONFIG_KEY, {"ranks": plan.lrc_ranks, **plan.summary()})


def save_compressed(model: PreTrainedModel, plan: RankPlan, out_dir: Path) -> None:
    """save_pretrained with the ranks recorded, plus welore.json (into `out_dir` as given); INT8
    weights are written dequantized, in the model's dtype, so the directory is the same either way."""
    record_plan(model, plan)
    model.save_pretrained(out_dir, state_dict=compressed_state_dict(model, model.dtype) if int8_layers(model) else None)
    write_json_atomic(Path(out_dir) / TABLE_FILE, plan.to_dict())


def save_merged(model: PreTrainedModel, out_dir: Path) -> int:
    """Multiply the factors back and save a plain dense model. Returns how many were merged."""
    merged = merge_lowrank(model)
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    model.save_pretrained(out_dir)
    return merged


def load_compressed(path: str | Path, dtype: torch.dtype, device: torch.device,
                    attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Load a directory written by `save_compressed` (LowRankLinear modules in place)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    ranks = compressed_ranks(config)
    if ranks is None:
        raise UserError(f"{path} is not a WeLore-compressed model (its config.json has no `welore` ranks)")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    install_empty(model, ranks)
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
             for name, tensor in _read_safetensors(path).items()}
    _missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_empty = [name for name, p in model.named_parameters() if p.is_meta]
    if unexpected or still_empty:
        raise UserError(
            f"{path}: weights do not match the recorded ranks (missing {still_empty[:3]}, unexpected "
            f"{unexpected[:3]}); the directory is damaged — compress the model again"
        )
    return model.to(device).eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path}: no model.safetensors (or index) found")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
