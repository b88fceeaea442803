"""Building and loading models through transformers: random init, pretrained, meta device."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lowmem_tune.catalog import ResolvedModel, gguf_installed
from lowmem_tune.compress.storage import load_compressed
from lowmem_tune.errors import UserError, one_line

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def pick_device(requested: str = "auto", gpu_index: int = 0) -> torch.device:
    """cpu, or cuda:`gpu_index` (torch's numbering, after CUDA_VISIBLE_DEVICES) when a GPU is there."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("hardware.device is cuda but torch sees no CUDA GPU (use hardware.device: cpu or auto)")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if not 0 <= gpu_index < count:
        raise UserError(f"hardware.gpu_index {gpu_index}: torch sees CUDA devices 0..{count - 1} "
                        "(numbered after CUDA_VISIBLE_DEVICES; see `lowmem-tune probe`)")
    return torch.device("cuda", gpu_index)


def quiet_library_progress() -> None:
    """transformers, datasets and the hub draw tqdm bars ("Loading weights", "Writing model
    shards") on stderr: noise in the headless lines, and torn text under the dashboard, which
    shows our own progress. bitsandbytes warns at import, on CPUs with AVX512-BF16, that its
    optional 4-bit CPU kernel package (from the hub) is missing: QLoRA on the CPU then runs
    through bitsandbytes' torch code, as it does offline anyway; and the `kernels` package it loads
    that through warns that it skipped the hub's publisher check."""
    import logging

    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)


def fast_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16): measured on a
    Xeon with AMX, a 2048 x 640 x 8192 matmul runs at 961 GFLOPS in bf16 and 276 in fp32. Without
    these units oneDNN emulates bf16, slower than fp32."""
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU with native bf16 (compute capability 8.0+) and on a CPU with bf16
    units (`fast_cpu_bf16`), fp32 elsewhere."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
    return torch.bfloat16 if device.type == "cpu" and fast_cpu_bf16() else torch.float32


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
        return load_compressed(resolved.local_dir, dtype, device, attn_implementation)
    source, kwargs = pretrained_source(path, resolved.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as err:
        first = one_line(err)
        raise UserError(
            f"could not load weights of {path!r}: {first} (offline? download it first with "
            "`huggingface-cli download`, or point model.name at a local directory)"
        ) from None
    if resolved.gguf_file:  # dequantized on loading: from here on a plain model, saved as one
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    return model.to(device)


def pretrained_source(source: str, revision: str | None = None) -> tuple[str, dict[str, str]]:
    """`from_pretrained`'s arguments for a directory, a hub id (at `revision`) or a .gguf file
    (read from its directory with `gguf_file`, through the gguf package)."""
    if source.endswith(".gguf"):
        gguf_installed()
        path = Path(source)
        return str(path.parent), {"gguf_file": path.name}
    return source, {"revision": revision} if revision else {}


def load_tokenizer(source: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory, a hub id (at `revision`) or a .gguf file; failure is a
    one-line UserError."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoTokenizer

    path, kwargs = pretrained_source(source, revision)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as err:
        # a directory whose config.json has a field of the wrong type fails transformers' validation
        shown = source if len(source) <= 120 else source[:119] + "…"
        raise UserError(f"could not load a tokenizer from {shown!r}: {one_line(err)}") from None


# transformers renamed gradient_checkpointing_* to activation_checkpointing_* during 5.x and keeps
# the old names as deprecated aliases; these three work on every version pyproject allows.


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing per decoder layer; inputs require grad so frozen embeddings work."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    model.enable_input_require_grads()


def activation_checkpointing_enabled(model: PreTrainedModel) -> bool:
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def disable_activation_checkpointing(model: PreTrainedModel) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def logits_at(model: PreTrainedModel, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits (kept positions, vocab) of the positions where the boolean mask `keep` (batch x seq)
    is set; only those rows reach the LM head. Decoder and head are called directly because
    `logits_to_keep` takes a 2-D mask only in newer transformers releases."""
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    return model.get_output_embeddings()(hidden[keep])
