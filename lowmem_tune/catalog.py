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

def _gemma3(hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int, vocab: int, window: int,
            max_positions: int, query_scalar: int, global_rope: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    """Gemma 3's text decoder: five sliding-window layers to one global layer, tied embeddings."""
    return {
        **_llama(hidden, inter, layers, heads, kv, vocab, head_dim=head_dim, max_position_embeddings=max_positions,
                 rms_norm_eps=1e-6, tie_word_embeddings=True),
        "sliding_window": window,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        "query_pre_attn_scalar": query_scalar,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": global_rope or {"rope_type": "default", "rope_theta": 1000000.0}},
        **extra,
    }


_GEMMA3_LONG = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
_QWEN3 = {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 40960}

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
        ModelSpec("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "llama",
                  _llama(4096, 14336, 32, 32, 8, 128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 8.0})),
        ModelSpec("mistral-nemo-12b", "mistralai/Mistral-Nemo-Base-2407", "mistral",
                  _llama(5120, 14336, 40, 32, 8, 131072, head_dim=128, max_position_embeddings=1024000,
                         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        ModelSpec("qwen3-0.6b", "Qwen/Qwen3-0.6B-Base", "qwen3",
                  _llama(1024, 3072, 28, 16, 8, 151936, head_dim=128, tie_word_embeddings=True, **_QWEN3)),
        ModelSpec("qwen3-1.7b", "Qwen/Qwen3-1.7B-Base", "qwen3",
                  _llama(2048, 6144, 28, 16, 8, 151936, head_dim=128, tie_word_embeddings=True, **_QWEN3)),
        ModelSpec("qwen3-4b", "Qwen/Qwen3-4B-Base", "qwen3",
                  _llama(2560, 9728, 36, 32, 8, 151936, head_dim=128, tie_word_embeddings=True, **_QWEN3)),
        ModelSpec("qwen3-8b", "Qwen/Qwen3-8B-Base", "qwen3",
                  _llama(4096, 12288, 36, 32, 8, 151936, head_dim=128, tie_word_embeddings=False, **_QWEN3)),
        ModelSpec("qwen3-14b", "Qwen/Qwen3-14B-Base", "qwen3",
                  _llama(5120, 17408, 40, 40, 8, 151936, head_dim=128, tie_word_embeddings=False, **_QWEN3)),
        # Gemma 3: 270m and 1b are text-only checkpoints; for 4b, 12b and 27b (image and text
        # checkpoints) the row is their text decoder, which is what text finetuning trains.
        ModelSpec("gemma-3-270m", "google/gemma-3-270m", "gemma3_text",
                  _gemma3(640, 2048, 18, 4, 1, 256, 262144, 512, 32768, 256)),
        ModelSpec("gemma-3-1b", "google/gemma-3-1b-pt", "gemma3_text",
                  _gemma3(1152, 6912, 26, 4, 1, 256, 262144, 512, 32768, 256)),
        ModelSpec("gemma-3-4b", "google/gemma-3-4b-pt", "gemma3_text",
                  _gemma3(2560, 10240, 34, 8, 4, 256, 262208, 1024, 131072, 256, _GEMMA3_LONG)),
        ModelSpec("gemma-3-12b", "google/gemma-3-12b-pt", "gemma3_text",
                  _gemma3(3840, 15360, 48, 16, 8, 256, 262208, 1024, 131072, 256, _GEMMA3_LONG)),
        ModelSpec("gemma-3-27b", "google/gemma-3-27b-pt", "gemma3_text",
                  _gemma3(5376, 21504, 62, 32, 16, 128, 262208, 1024, 131072, 168, _GEMMA3_LONG)),
        # Tiny architectures for tests, the demo and CPU benchmarks (random weights, local tokenizer).
        ModelSpec("demo-llama", None, "llama",
                  _llama(128, 352, 4, 4, 4, 512, max_position_embeddings=512, rms_norm_eps=1e-5)),
        ModelSpec("tiny-llama", None, "llama",
                  _llama(64, 176, 2, 4, 2, 256, max_position_embeddings=256, rms_norm_eps=1e-5)),
        ModelSpec("small-llama", None, "llama",
                  _llama(512, 1376, 8, 8, 8, 8000, max_position_embeddings=2048, rms_norm_eps=1e-5)),
        ModelSpec("tiny-gemma3", None, "gemma3_text",
                  _gemma3(64, 128, 6, 2, 1, 32, 512, 16, 256, 32)),
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

    gguf_file: str | None = None
    """The GGUF file in `local_dir` the weights and tokenizer come from (source "gguf")."""
    revision: str | None = None
    """The hub revision (branch, tag or commit) config, weights and tokenizer are read at."""

    @property
    def pretrained_path(self) -> str | None:
        """Where the weights are: the local directory (or the GGUF file in it), else the hub id.
        `modeling.load_model` and `load_tokenizer` read either."""
        if self.local_dir is not None:
            return str(self.local_dir / self.gguf_file) if self.gguf_file else str(self.local_dir)
        return self.hub_id


def resolve_model(name: str, revision: str | None = None) -> ResolvedModel:
    """Resolve a catalog name, a local model directory, a config.json, a .gguf file, or a hub id
    (at `revision`, which only a hub id has)."""
    if revision is not None:
        if "/" not in name or name.count("/") != 1 or _path_kind(Path(name).expanduser(), name) is not None:
            raise UserError(f"model.revision {revision!r}: only a hub id (owner/name) has revisions, not {name!r}; "
                            "remove model.revision")
        return ResolvedModel(name, _config_from_hub(name, revision), name, None, "hub", revision=revision)
    if name in CATALOG:
        spec = CATALOG[name]
        return ResolvedModel(name, spec.build_config(), spec.hub_id, None, "catalog")
    path = Path(name).expanduser()
    kind = _path_kind(path, name)
    if kind == "dir":
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json (expected a save_pretrained folder)")
        return ResolvedModel(path.name, _config_from_file(path / "config.json"), None, path, "local")
    if kind == "file":
        if path.suffix == ".gguf":
            return ResolvedModel(path.stem, _config_from_gguf(path), None, path.parent, "gguf", path.name)
        if path.suffix != ".json":
            raise UserError(f"--model {name}: a file must be a config.json or a .gguf file; give the model's "
                            "directory instead")
        return ResolvedModel(path.parent.name or path.stem, _config_from_file(path), None, path.parent, "local")
    if name.startswith((".", "/", "~")):
        raise UserError(f"model directory not found: {path} (a save_pretrained folder, a catalog name or a hub id)")
    if "/" in name and name.count("/") == 1:
        return ResolvedModel(name, _config_from_hub(name), name, None, "hub")
    close = difflib.get_close_matches(name, list(CATALOG), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"catalog: {', '.join(CATALOG)}"
    raise UserError(f"unknown model {name!r}: not in the catalog, not a local directory, not a hub id ({hint})")


def _path_kind(path: Path, name: str) -> str | None:
    """"dir", "file", or None when nothing is there; a name no file system takes (too long, ...) is
    a UserError, not an OSError."""
    try:
        return "dir" if path.is_dir() else "file" if path.is_file() else None
    except OSError as err:
        shown = name if len(name) <= 80 else name[:79] + "…"
        raise UserError(f"model {shown!r}: not a usable path ({err.strerror or one_line(err)}); give a catalog "
                        "name, a hub id (owner/name) or a model directory") from None


def _config_from_file(path: Path) -> PretrainedConfig:
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as err:  # not JSON, not UTF-8, unreadable
        raise UserError(f"{path}: not a transformers config.json ({one_line(err, 160)}); give the directory "
                        "save_pretrained wrote") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise UserError(f"{path}: not a transformers config.json (a JSON mapping with a model_type); give the "
                        "directory save_pretrained wrote")
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise UserError(f"{path}: unsupported model_type {model_type!r} ({one_line(err, 160)})") from None
    except (TypeError, KeyError, StrictDataclassError) as err:  # a field of the wrong type: the config validates it
        raise UserError(f"{path}: not a valid {model_type} config ({one_line(err, 200)}); correct the file or "
                        "give the directory save_pretrained wrote") from None


def gguf_installed() -> None:
    """transformers reads GGUF files through the `gguf` package, which lowmem-tune does not install."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading a .gguf model needs the gguf package: pip install gguf")


def _config_from_gguf(path: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    gguf_installed()
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: could not read it as a GGUF model ({one_line(err)})") from None
    config.__dict__.pop("quantization_config", None)  # dequantized when loaded: a plain model from then on
    return config


def _config_from_hub(hub_id: str, revision: str | None = None) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hub_id, revision=revision)
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
