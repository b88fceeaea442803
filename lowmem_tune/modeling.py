"""Building and loading models through transformers: random init, pretrained, meta device."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lowmem_tune.catalog import ResolvedModel
from lowmem_tune.errors import UserError, one_line

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("hardware.device is cuda but torch sees no CUDA GPU (use hardware.device: cpu or auto)")
    return torch.device("cuda" if torch.cuda.is_available() and requested != "cpu" else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU with native bf16 (compute capability 8.0+), fp32 elsewhere.

    fp32 on CPU because bf16 matmuls there are emulated and several times slower.
    """
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


def build_empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """The architecture on the meta device: shapes and dtypes, no memory."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # transformers skips tying under init_empty_weights
    return model


def load_model(
    resolved: ResolvedModel,
    init: str,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PreTrainedModel:
    """A causal LM with pretrained weights (local dir or hub, honouring HF_HUB_OFFLINE) or random ones."""
    if init == "random":
        torch.manual_seed(seed)
        config = resolved.config
        config._attn_implementation = attn_implementation
        # Built on `device` directly: a 7B model initialized on the CPU first takes minutes and 13 GB of RAM.
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        return model.to(device)
    path = resolved.pretrained_path
    if path is None:
        raise UserError(
            f"model {resolved.name!r} has no weights to load (it is an architecture only): set model.init: random"
        )
    if resolved.local_dir is not None and getattr(resolved.config, "welore", None):
        from lowmem_tune.compress import load_compressed  # compress imports this module

        return load_compressed(resolved.local_dir, dtype, device, attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as err:
        first = one_line(err)
        raise UserError(
            f"could not load weights of {path!r}: {first} (offline? download it first with "
            "`huggingface-cli download`, or point model.name at a local directory)"
        ) from None
    return model.to(device)


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory or a hub id; failure is a one-line UserError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer from {source!r}: {one_line(err)}") from None


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing per decoder layer; inputs require grad so frozen embeddings work."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.enable_input_require_grads()


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
