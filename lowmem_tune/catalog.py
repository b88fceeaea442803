"""Model catalog: architecture configs of the models people finetune on one GPU.

Each entry is the published architecture (from the model's config.json on the hub) and the hub id
it maps to, so `plan` works offline and instantly. Parameter counts are never typed in: they come
from building the model on the meta device (`count_parameters`).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers imports torch (seconds): `plan` reads the catalog without it
    from transformers import PretrainedConfig

from lowmem_tune.errors import UserError, one_line


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str | None
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)

    def build_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **self.config)


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, **extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        **extra,
    }


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}

CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("llama-2-7b", "meta-llama/Llama-2-7b-hf", "llama",
                  _llama(4096, 11008, 32, 32, 32, 32000, max_position_embeddings=4096, rms_norm_eps=1e-5)),
        ModelSpec("llama-2-13b", "meta-llama/Llama-2-13b-hf", "llama",
                  _llama(5120, 13824, 40, 40, 40, 32000, max_position_embeddings=4096, rms_norm_eps=1e-5)),
        ModelSpec("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "llama",
                  _llama(4096, 14336, 32, 32, 8, 128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
        ModelSpec("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "llama",
                  _llama(2048, 8192, 16, 32, 8, 128256, head_dim=64, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE)),
        ModelSpec("llama-3.2-3b", "meta-llama/Llama-3.2-3B", "llama",
                  _llama(3072, 8192, 28, 24, 8, 128256, head_dim=128, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE)),
        ModelSpec("mistral-7b", "mistralai/Mistral-7B-v0.1", "mistral",
                  _llama(4096, 14336, 32, 32, 8, 32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         sliding_window=4096)),
        ModelSpec("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "qwen2",
                  _llama(896, 4864, 24, 14, 2, 151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        ModelSpec("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "qwen2",
                  _llama(1536, 8960, 28, 12, 2, 151936, max_position_embeddings=131072, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B", "qwen2",
                  _llama(3584, 18944, 28, 28, 4, 152064, max_position_embeddings=131072, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        ModelSpec("tinyllama-1.1b", "TinyLlama/TinyLlama_v1.1", "llama",
                  _llama(2048, 5632, 22, 32, 4, 32000, max_position_embeddings=2048, rms_norm_eps=1e-5)),
        # Tiny architectures for tests, the demo and CPU benchmarks (random weights, local tokenizer).
        ModelSpec("demo-llama", None, "llama",
                  _llama(128, 352, 4, 4, 4, 512, max_position_embeddings=512, rms_norm_eps=1e-5)),
        ModelSpec("tiny-llama", None, "llama",
                  _llama(64, 176, 2, 4, 2, 256, max_position_embeddings=256, rms_norm_eps=1e-5)),
        ModelSpec("small-llama", None, "llama",
                  _llama(512, 1376, 8, 8, 8, 8000, max_position_embeddings=2048, rms_norm_eps=1e-5)),
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    """What `--model` / `model.name` named: a catalog entry, a local directory or a hub id."""

    name: str
    config: PretrainedConfig
    hub_id: str | None
    local_dir: Path | None
    source: str  # "catalog", "local", "hub"

    @property
    def pretrained_path(self) -> str | None:
        """Where `from_pretrained` reads weights: the local directory, else the hub id."""
        if self.local_dir is not None:
            return str(self.local_dir)
        return self.hub_id


def resolve_model(name: str) -> ResolvedModel:
    """Resolve a catalog name, a local model directory, a config.json, or a hub id."""
    if name in CATALOG:
        spec = CATALOG[name]
        return ResolvedModel(name, spec.build_config(), spec.hub_id, None, "catalog")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json (expected a save_pretrained folder)")
        return ResolvedModel(path.name, _config_from_file(path / "config.json"), None, path, "local")
    if path.is_file():
        if path.suffix != ".json":
            raise UserError(f"--model {name}: a file must be a config.json; give the model's directory instead")
        return ResolvedModel(path.parent.name or path.stem, _config_from_file(path), None, path.parent, "local")
    if name.startswith((".", "/", "~")):
        raise UserError(f"model directory not found: {path} (a save_pretrained folder, a catalog name or a hub id)")
    if "/" in name and name.count("/") == 1:
        return ResolvedModel(name, _config_from_hub(name), name, None, "hub")
    close = difflib.get_close_matches(name, list(CATALOG), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"catalog: {', '.join(CATALOG)}"
    raise UserError(f"unknown model {name!r}: not in the catalog, not a local directory, not a hub id ({hint})")


def _config_from_file(path: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
    except (json.JSONDecodeError, KeyError) as err:
        raise UserError(f"{path}: not a transformers config.json ({err})") from None
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise UserError(f"{path}: unsupported model_type {model_type!r} ({err})") from None


def _config_from_hub(hub_id: str) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hub_id)
    except (OSError, ValueError) as err:
        first = one_line(err)
        raise UserError(
            f"could not read the config of hub model {hub_id!r} (offline or not cached?): {first} — "
            "pass a local model directory or a catalog name instead"
        ) from None


def count_parameters(config: PretrainedConfig) -> int:
    """Parameter count of the architecture, from a model built on the meta device."""
    from lowmem_tune.layers import build_empty_model

    model = build_empty_model(config)
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:  # tied embeddings count once
            seen.add(id(param))
            total += param.numel()
    return total
