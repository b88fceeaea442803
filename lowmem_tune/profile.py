"""Run profiles: plain YAML, validated when loaded, with errors that name the file and the key.

A profile has seven sections (`model`, `hardware`, `strategy`, `data`, `train`, `output`,
`eval`). Each is a dataclass below; the field types and `Literal` choices are the schema, and the
defaults are what an omitted key means. `--set a.b=value` overrides are applied before validation,
so they get the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lowmem_tune.errors import UserError
from lowmem_tune.resources import profiles_dir

STRATEGIES = ("full", "adamw8bit", "galore", "fira", "lisa", "owlore", "welore")


@dataclass
class ModelSection:
    name: str = "demo-llama"
    """Catalog name, hub id, local model directory, or a config.json."""
    init: Literal["pretrained", "random"] = "pretrained"
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """auto: bfloat16 on a GPU that supports it, float32 on CPU (bf16 matmuls are slow there)."""
    tokenizer: str | None = None
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


@dataclass
class HardwareSection:
    gpu: str = "auto"
    """auto (probe), a preset name (rtx4090, ...) or a size (24GB, 24GiB, 16000MiB)."""
    gpu_index: int = 0
    """The CUDA device a run trains on, in torch's numbering (after CUDA_VISIBLE_DEVICES)."""
    margin: float = 0.10
    device: Literal["auto", "cuda", "cpu"] = "auto"


@dataclass
class StrategySection:
    name: Literal["full", "adamw8bit", "galore", "fira", "lisa", "owlore", "welore"] = "galore"
    # GaLore / Fira (and GaLore inside OwLore, LISA and WeLore when optimizer: galore)
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    bits: Literal[8, 32] = 8
    layerwise: bool = True
    moments: Literal["keep", "project", "reset"] = "keep"
    svd: Literal["full", "randomized"] = "full"
    fira_limiter: float = 1.01
    # Layer sampling (LISA, OwLore)
    sampled_layers: int = 2
    interval: int = 20
    outlier_threshold: float = 13.0
    """M: OwLore's published LLaMA-2-7B ratios use 13 (see strategies/outliers.py for why)."""
    temperature: float = 1.0
    calibration_samples: int = 32
    calibration_seq_len: int = 256
    calibration_file: str | None = None
    train_embeddings: bool | None = None
    """Train embeddings, final norm and lm_head full-rank. null: the method's own default — on
    for LISA / OwLore, off for WeLore (LRC-only finetuning of a pretrained model)."""
    inactive_state: Literal["drop", "offload"] = "drop"
    optimizer: Literal["galore", "adamw", "adamw8bit"] = "galore"
    """Optimizer inside sampled layers (OwLore, LISA) or for the low-rank factors (WeLore)."""
    # WeLore
    rank_reduction: float = 0.5
    min_ratio: float = 0.5
    compressed_model: str | None = None
    train_norms: bool = True


@dataclass
class DataSection:
    dataset: str = "synthetic-boolq"
    """synthetic-boolq, an evaluation task name (boolq, strategyqa), a hub id, or a local file."""
    format: Literal["auto", "instruction", "boolq", "strategyqa", "text"] = "auto"
    config_name: str | None = None
    split: str = "train"
    max_seq_len: int = 512
    prompt_template: str | None = None
    response_template: str | None = None
    train_on_prompt: bool = False
    packing: bool = False
    shuffle: bool = True
    limit: int | None = None
    heldout: float = 0.05
    """Share (below 1) or count (1 and above) of examples kept out of training for the eval loss."""
    num_examples: int = 4000
    """Size of the generated synthetic-boolq set."""


@dataclass
class TrainSection:
    max_steps: int = 1000
    micro_batch_size: int = 4
    gradient_accumulation: int = 1
    lr: float = 1.0e-5
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    max_grad_norm: float | None = 1.0
    activation_checkpointing: bool = True
    seed: int = 42
    save_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10


@dataclass
class OutputSection:
    dir: str = "runs/run"
    save_final: bool = True


@dataclass
class EvalSection:
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    baseline: bool = False
    num_fewshot: int = 0
    batch_size: int = 8
    data_files: dict[str, str] = field(default_factory=dict)
    """Local files per task (task name -> JSON / JSONL / parquet in the task's schema)."""


@dataclass
class Profile:
    model: ModelSection = field(default_factory=ModelSection)
    hardware: HardwareSection = field(default_factory=HardwareSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def load_profile(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    """Read, override and validate a profile. Raises UserError naming the file and key path."""
    path = _find_profile(Path(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a profile is a mapping of sections (model, strategy, data, train, ...)")
    apply_overrides(raw, overrides)
    return profile_from_dict(raw, source=str(path))


def _find_profile(path: Path) -> Path:
    """The file itself, else a shipped profile of that name (`demo`, `demo.yaml`, `profiles/demo.yaml`
    work from any directory once the package is installed)."""
    if path.is_file():
        return path
    shipped_dir = profiles_dir()
    for name in (path.name, f"{path.name}.yaml"):
        if (shipped_dir / name).is_file():
            return shipped_dir / name
    ready = ", ".join(sorted(p.stem for p in shipped_dir.glob("*.yaml")))
    raise UserError(f"profile not found: {path} (ready profiles: {ready}; or write one with `lowmem-tune plan -o`)")


def profile_from_dict(raw: dict[str, Any], source: str = "profile") -> Profile:
    profile = _build(Profile, raw, source, "")
    _check_values(profile, source)
    return profile


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply `a.b=value` overrides in place; the value is parsed as YAML (so 1e-4, true, [a, b])."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"--set {item!r}: the key is SECTION.KEY, e.g. strategy.name or train.lr")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise UserError(f"--set {item!r}: section {parts[0]!r} is not a mapping in the profile")
        section[parts[1]] = parsed


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise UserError(f"{source}: unknown key {prefix}{key}{_did_you_mean(str(key), names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, source, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], source, key)
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
        choices = ", ".join(str(a) for a in args)
        hint_text = _did_you_mean(str(value), [str(a) for a in args]) if isinstance(value, str) else ""
        raise UserError(f"{source}: {key}: {value!r} is not one of: {choices}{hint_text}")
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(value, list):
            raise UserError(f"{source}: {key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], source, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{source}: {key}: expected a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
            except ValueError:
                pass
        raise UserError(f"{source}: {key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{source}: {key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported profile field type {hint!r} for {key}")


def _check_values(profile: Profile, source: str) -> None:
    def bad(key: str, message: str) -> UserError:
        return UserError(f"{source}: {key}: {message}")

    t, s, d, h = profile.train, profile.strategy, profile.data, profile.hardware
    positive = {
        "train.max_steps": t.max_steps,
        "train.micro_batch_size": t.micro_batch_size,
        "train.gradient_accumulation": t.gradient_accumulation,
        "train.save_every": t.save_every,
        "train.keep_checkpoints": t.keep_checkpoints,
        "train.eval_every": t.eval_every,
        "train.log_every": t.log_every,
        "strategy.rank": s.rank,
        "strategy.update_proj_gap": s.update_proj_gap,
        "strategy.sampled_layers": s.sampled_layers,
        "strategy.interval": s.interval,
        "strategy.calibration_samples": s.calibration_samples,
        "strategy.calibration_seq_len": s.calibration_seq_len,
        "data.max_seq_len": d.max_seq_len,
        "data.num_examples": d.num_examples,
    }
    for key, value in positive.items():
        if value <= 0:
            raise bad(key, f"must be at least 1, got {value}")
    if not t.lr > 0:
        raise bad("train.lr", f"must be positive, got {t.lr}")
    if t.warmup_steps < 0:
        raise bad("train.warmup_steps", f"must be 0 or more, got {t.warmup_steps}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        raise bad("train.max_grad_norm", "must be positive, or null to turn clipping off")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise bad("train.betas", f"expected two numbers in [0, 1), got {t.betas}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise bad("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if not 0 <= h.margin < 1:
        raise bad("hardware.margin", f"must be in [0, 1), got {h.margin}")
    if not 0 < s.rank_reduction < 1:
        raise bad("strategy.rank_reduction", f"must be between 0 and 1 (e.g. 0.5), got {s.rank_reduction}")
    if not 0 < s.min_ratio < 1:
        raise bad("strategy.min_ratio", f"must be between 0 and 1, got {s.min_ratio}")
    if s.scale <= 0:
        raise bad("strategy.scale", f"must be positive, got {s.scale}")
    if s.temperature <= 0:
        raise bad("strategy.temperature", f"must be positive, got {s.temperature}")
    if s.outlier_threshold <= 1:
        raise bad("strategy.outlier_threshold", f"is M in 'score > M x mean'; must be above 1, got {s.outlier_threshold}")
    if d.heldout < 0:
        raise bad("data.heldout", f"must be 0 or more, got {d.heldout}")
    if d.limit is not None and d.limit <= 0:
        raise bad("data.limit", f"must be at least 1 or null, got {d.limit}")
    if profile.eval.batch_size <= 0:
        raise bad("eval.batch_size", f"must be at least 1, got {profile.eval.batch_size}")
    if not profile.output.dir:
        raise bad("output.dir", "must name a directory")
