"""Plain nn helpers for Llama-family causal LMs: the decoder stack, its linears and norms, and the
architecture on the meta device. A leaf: it imports nothing else of the package but its errors, so
every layer above can use it."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lowmem_tune.errors import UserError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a Llama-family causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__} is not a Llama-family causal LM (no model.layers)")
    return layers


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear projections of one decoder layer by short name (q_proj, ..., down_proj)."""
    return {name.rsplit(".", 1)[-1]: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """A linear's weight values: its own, or the dequantized copy of an INT8 one (quantize.py)."""
    dequantized = getattr(linear, "dequantized_weight", None)
    return dequantized() if dequantized is not None else linear.weight


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def move_to(module: nn.Module, device: torch.device) -> nn.Module:
    """`module.to(device)` unless it is there already (under `plan --verify`'s fake tensors a no-op
    `.to` still tries to swap every parameter, which fails)."""
    if any(t.device != device for t in (*module.parameters(), *module.buffers())):
        module.to(device)
    return module


def build_empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """The architecture on the meta device: shapes and dtypes, no memory."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # transformers skips tying under init_empty_weights
    return model
