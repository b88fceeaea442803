"""Run profiles: plain YAML, validated when loaded, with errors that name the file and the key.

A profile has seven sections (`model`, `hardware`, `strategy`, `data`, `train`, `output`,
`eval`). Each is a dataclass below; the field types and `Literal` choices are the schema, and the
defaults are what an omitted key means. `--set a.b=value` overrides are applied before validation,
so they get the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lowmem_tune.errors import UserError, one_line
# the method names live in profile_methods (a leaf); every importer of profile finds them here too
from lowmem_tune.profile_methods import (ADAPTERS, APOLLO, FULL_PARAMETER, GALORE_INSIDE, INT8_CAPABLE, LAYER_SAMPLING,
                                         LOW_RANK_INSIDE, STRATEGY_NAMES, InsideOptimizer, optimizer_error,
                                         replace_file_defaults, with_defaults)
from lowmem_tune.resources import chat_template_names, profiles_dir
from lowmem_tune.schema import POSITIVE, SHARE, Bounds, above, applies_to, at_least, build, knob

StrategyName = Literal[STRATEGY_NAMES]  # type: ignore[valid-type]
ONE = at_least(1)
TRUNCATIONS = ("cut_prompt", "drop")
"""`data.truncation`: what happens to an example longer than `data.max_seq_len` (see DataSection)."""
Truncation = Literal[TRUNCATIONS]  # type: ignore[valid-type]


@dataclass
class ModelSection:
    name: str = "demo-llama"
    """Catalog name, hub id, local model directory, or a config.json."""
    init: Literal["pretrained", "random"] = "pretrained"
    dtype: Literal["auto", "bfloat16", "float32", "float16", "float64"] = "auto"
    """auto: bfloat16 on a GPU that supports it and on a CPU with bf16 units (AMX or AVX512-BF16),
    float32 elsewhere (bf16 is emulated there, and slower); float64 is for checks of exactness."""
    tokenizer: str | None = None
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


@dataclass
class HardwareSection:
    gpu: str = "auto"
    """auto (probe), a preset name (rtx4090, ...) or a size (24GB, 24GiB, 16000MiB)."""
    gpu_index: int = knob(0, bounds=at_least(0))
    """The CUDA device a run trains on, in torch's numbering (after CUDA_VISIBLE_DEVICES)."""
    margin: float = knob(0.10, bounds=Bounds(0, 1, high_open=True))
    device: Literal["auto", "cuda", "cpu"] = "auto"


@dataclass
class StrategySection:
    name: StrategyName = "galore"
    # GaLore / Fira / APOLLO (and GaLore or APOLLO inside OwLore and LISA, GaLore inside WeLore)
    rank: int = knob(128, bounds=ONE, applies=LOW_RANK_INSIDE)
    """GaLore's default; APOLLO's 256, APOLLO-Mini's 1 (METHOD_DEFAULTS)."""
    update_proj_gap: int = knob(200, bounds=ONE, applies=LOW_RANK_INSIDE)  # GaLore's SVD, APOLLO's random draw
    scale: float = knob(0.25, bounds=POSITIVE, applies=LOW_RANK_INSIDE)
    """Factor on the update: GaLore's alpha; APOLLO's 1, Mini's sqrt(128) (apollo-torch's is its square)."""
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = knob("std", applies=GALORE_INSIDE)
    bits: Literal[8, 32] = knob(8, applies=LOW_RANK_INSIDE)
    layerwise: bool = knob(True, applies=LOW_RANK_INSIDE)
    """GaLore: gradients consumed in backward hooks. APOLLO: each matrix updated in its hook."""
    moments: Literal["keep", "project", "reset"] = knob("keep", applies=GALORE_INSIDE)
    svd: Literal["sketch", "exact", "randomized", "first_micro_batch"] = knob("sketch", applies=GALORE_INSIDE)
    """Where a subspace comes from: `sketch`, a randomized sketch of the whole batch's gradient
    built in the backward hooks (no full gradient outlives its hook); `exact` / `randomized`, the
    SVD (exact, or randomized with power iterations) of the accumulated gradient, which layerwise
    mode then keeps until the step; `first_micro_batch`, the exact SVD of the first micro-batch's
    gradient (the rule before the sketch; kept to compare, see README)."""
    rounding: Literal["stochastic", "nearest"] = knob("stochastic", applies=FULL_PARAMETER)
    """How updates are written into 16-bit (and INT8) weights: stochastically rounded (unbiased: a
    step smaller than half a bf16 ulp, or an INT8 code step, still moves the weight in
    expectation) or to nearest. For AdamW (`full`, `adamw8bit`, `optimizer: adamw` / `adamw8bit`),
    nearest means torch's / bitsandbytes' own optimizer, moments in the weights' dtype for torch's."""
    weight_bits: Literal[16, 8] = knob(16, applies=INT8_CAPABLE)
    """8: decoder linear weights stored as int8 codes with a scale per group (quantize.py); the
    16-bit copy of a weight exists only inside its own layer's forward and backward."""
    group_size: int = knob(256, bounds=ONE, applies=INT8_CAPABLE)
    """Input features per INT8 scale (a row whose width it does not divide ends in a shorter group)."""
    fira_limiter: float = knob(1.01, bounds=at_least(1), applies=("fira",) + APOLLO)
    """gamma: a term whose norm grows past gamma times the last step's is scaled back (Fira: its
    scaled residual; APOLLO: its scaled gradient, as apollo-torch)."""
    # Layer sampling (LISA, OwLore)
    sampled_layers: int = knob(2, bounds=ONE, applies=LAYER_SAMPLING)
    interval: int = knob(20, bounds=ONE, applies=LAYER_SAMPLING)
    outlier_threshold: float = knob(13.0, bounds=above(1), applies=("owlore",))
    """M: OwLore's published LLaMA-2-7B ratios use 13 (see strategies/outliers.py for why)."""
    temperature: float = knob(1.0, bounds=POSITIVE, applies=("owlore",))
    calibration_samples: int = knob(32, bounds=ONE, applies=("owlore",))
    calibration_seq_len: int = knob(256, bounds=ONE, applies=("owlore",))
    calibration_file: str | None = knob(None, applies=("owlore",))
    embedding_rank: int | None = knob(None, bounds=ONE, applies=("galore", "lisa", "owlore"))
    """Train the embeddings and lm_head through GaLore at this rank (their gradients and states are
    then rank-sized: for a 128k vocabulary that is what makes 8B models fit); null: full-rank AdamW."""
    train_embeddings: bool | None = None
    """Train embeddings, final norm and lm_head. null: the method's own default — on for every
    method but WeLore (LRC-only finetuning of a pretrained model keeps them frozen)."""
    inactive_state: Literal["drop", "offload"] = knob("drop", applies=LAYER_SAMPLING)
    optimizer: InsideOptimizer = knob("galore", applies=LAYER_SAMPLING + ("welore",))
    """Optimizer inside sampled layers (OwLore, LISA) or for the low-rank factors (WeLore: not apollo)."""
    # WeLore
    rank_reduction: float = knob(0.5, bounds=SHARE, applies=("welore",))
    min_ratio: float = knob(0.5, bounds=SHARE, applies=("welore",))
    compressed_model: str | None = knob(None, applies=("welore",))
    train_norms: bool = knob(True, applies=("welore",))
    # Adapters (peft): LoRA, QLoRA (NF4 base), DoRA
    lora_rank: int = knob(16, bounds=ONE, applies=ADAPTERS)
    lora_alpha: float = knob(32.0, bounds=POSITIVE, applies=ADAPTERS)  # the output is scaled by alpha / rank
    lora_dropout: float = knob(0.05, bounds=Bounds(0, 1, high_open=True), applies=ADAPTERS)
    target_modules: list[str] | None = knob(None, applies=ADAPTERS)
    """Short names of the decoder linears that get adapters (q_proj, ..., down_proj); null: all."""


def strategy_knobs(strategy: str) -> list[str]:
    """The StrategySection keys that `strategy` reads (name included)."""
    return [f.name for f in dataclasses.fields(StrategySection)
            if applies_to(f) is None or strategy in applies_to(f)]


def _check_strategy_keys(raw: dict[str, Any], source: str) -> None:
    """A strategy key the chosen strategy does not read is a mistake, not a no-op."""
    section = raw.get("strategy") or {}
    if not isinstance(section, dict):
        return
    name = section.get("name", StrategySection.name)
    for f in dataclasses.fields(StrategySection):
        applies = applies_to(f)
        if f.name in section and applies is not None and name not in applies:
            raise UserError(
                f"{source}: strategy.{f.name} does not apply to strategy {name} (it applies to: "
                f"{', '.join(applies)}); remove it or choose one of those strategies"
            )


@dataclass
class DataSection:
    dataset: str = "synthetic-boolq"
    """synthetic-boolq, an evaluation task name (boolq, strategyqa), a hub id, or a local file."""
    format: Literal["auto", "instruction", "boolq", "strategyqa", "text", "messages", "sharegpt"] = "auto"
    """auto: told from the records' fields. messages / sharegpt are conversations, rendered by a chat
    template (see chat_template), with the loss on the assistant turns."""
    chat_template: str | None = None
    """For the chat formats: a shipped template's name (chatml, gemma, llama3, mistral:
    lowmem_tune/data/chat_templates/) or a Jinja file. null: the tokenizer's own chat template,
    else chatml."""
    config_name: str | None = None
    split: str = "train"
    max_seq_len: int = knob(512, bounds=ONE)
    truncation: Truncation = "cut_prompt"
    """An example longer than max_seq_len: `cut_prompt` keeps its whole response and EOS and the end of
    its prompt (cut from the left; BOS stays first), and drops it when the answer alone (BOS,
    response, EOS) is longer; an example without a prompt (format text) is cut at max_seq_len; a
    conversation loses whole exchanges, earliest first (its system message stays), and is dropped
    when its last exchange alone is longer. `drop` drops every example longer than max_seq_len.
    The run says what was cut or dropped."""
    prompt_template: str | None = None
    response_template: str | None = None
    train_on_prompt: bool = False
    packing: bool = False
    shuffle: bool = True
    limit: int | None = knob(None, bounds=ONE)
    heldout: float = knob(0.05, bounds=at_least(0))
    """Share (below 1) or count (1 and above) of examples kept out of training for the eval loss."""
    num_examples: int = knob(4000, bounds=Bounds(1, 100_000))
    """Size of the generated synthetic-boolq set (it has about 36,600 distinct training rows and
    5,800 validation rows: a larger set repeats them; the cap keeps a typo from generating forever)."""


@dataclass
class TrainSection:
    max_steps: int = knob(1000, bounds=ONE)
    micro_batch_size: int = knob(4, bounds=ONE)
    gradient_accumulation: int = knob(1, bounds=ONE)
    lr: float = knob(1.0e-5, bounds=POSITIVE)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = knob(0, bounds=at_least(0))
    min_lr_ratio: float = knob(0.0, bounds=Bounds(0, 1))
    weight_decay: float = knob(0.0, bounds=at_least(0))
    betas: list[float] = knob(bounds=Bounds(0, 1, high_open=True), factory=lambda: [0.9, 0.999])
    eps: float = knob(1.0e-8, bounds=POSITIVE)
    max_grad_norm: float | None = knob(1.0, bounds=POSITIVE)
    """null turns clipping off."""
    activation_checkpointing: bool = True
    seed: int = knob(42, bounds=Bounds(-(2**32), 2**32))
    """Seeds torch, the data order and the layer sampling; the batch order's generator takes
    seed x 1,000,003 + epoch, which must stay within 64 bits."""
    save_every: int = knob(200, bounds=ONE)
    keep_checkpoints: int = knob(2, bounds=ONE)
    eval_every: int = knob(200, bounds=ONE)
    eval_batches: int = knob(8, bounds=ONE)
    log_every: int = knob(10, bounds=ONE)


@dataclass
class OutputSection:
    dir: str = "runs/run"
    save_final: bool = True


@dataclass
class EvalSection:
    tasks: list[str] = field(default_factory=list)
    limit: int | None = knob(None, bounds=ONE)
    baseline: bool = False
    num_fewshot: int = knob(0, bounds=at_least(0))
    batch_size: int = knob(8, bounds=ONE)
    data_files: dict[str, str] = field(default_factory=dict)
    """Local files per task (task name -> JSON / JSONL / parquet / save_to_disk directory in the task's
    schema), or per suite (suite name -> a directory with an entry per task or subject)."""
    add_bos: bool | None = None
    """BOS before every sequence: null puts it where the tokenizer does on its own (Llama's, Gemma's
    and Mistral's do), as lm-evaluation-harness does by default; true / false override that, like
    the harness's add_bos_token. The run's training and held-out examples follow the same choice,
    so the model is scored on sequences that begin the way its training sequences began."""
    apply_chat_template: bool = False
    """Render each evaluation context with the tokenizer's chat template (the run's, which a run on
    chat data sets from data.chat_template), as lm-evaluation-harness' --apply_chat_template; a
    tokenizer without one is an error at the run's start."""
    fewshot_as_multiturn: bool | None = None
    """With apply_chat_template: few-shot examples as user / assistant turns (null: yes, the harness's
    default) or false: joined with the question into one user turn."""


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
        """Every key, except strategy keys the chosen strategy does not read (loading refuses those)."""
        raw = dataclasses.asdict(self)
        raw["strategy"] = {k: v for k, v in raw["strategy"].items() if k in strategy_knobs(self.strategy.name)}
        return raw

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def load_profile(path: str | Path, overrides: list[str] | tuple[str, ...] = (), notes: list[str] | None = None,
                 ) -> Profile:
    """Read, override and validate a profile. Raises UserError naming the file and key path.

    `--set strategy.name=X` switches the method: the file's strategy keys that X does not read are
    dropped, and a line in `notes` says which (a key given with --set that X does not read is an
    error, as in the file)."""
    path = _find_profile(Path(path))
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a profile is a mapping of sections (model, strategy, data, train, ...)")
    file_strategy = dict(raw.get("strategy") or {}) if isinstance(raw.get("strategy"), dict) else {}
    apply_overrides(raw, overrides)
    strategy = raw.get("strategy")
    file_name = file_strategy.get("name", StrategySection.name)  # a file that names none runs the default
    if isinstance(strategy, dict) and strategy.get("name", file_name) != file_name:
        reads = strategy_knobs(str(strategy["name"]))
        dropped = [k for k in file_strategy if k not in reads and strategy.get(k) == file_strategy[k]]
        for key in dropped:
            del strategy[key]
        if dropped and notes is not None:
            notes.append(f"strategy.name={strategy['name']} (--set): {strategy['name']} does not read "
                         f"{', '.join('strategy.' + k for k in dropped)} from {path}, so they are left out")
        if (replaced := replace_file_defaults(strategy, file_strategy, path)) and notes is not None:
            notes.append(replaced)
    return profile_from_dict(raw, source=str(path))


def _read_yaml(path: Path) -> Any:
    """The parsed file; a file that is not UTF-8 YAML (binary, another encoding, nested past what
    the parser recurses into) is a one-line UserError naming the file and the place."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read the profile ({one_line(err)})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[err.start]:02x}); save the profile "
                        "as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
        return {} if raw is None else raw  # an empty file is an empty profile; `[]` or `0` is not a profile
    except yaml.reader.ReaderError as err:  # a control character (NUL, ...) where YAML allows none
        line = text[: err.position].count("\n") + 1
        char = chr(err.character) if isinstance(err.character, int) else err.character
        raise UserError(f"{path}: line {line} is not valid YAML: the character {char!r} is not allowed in YAML; "
                        "remove it") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise UserError(f"{path}:{where} is not valid YAML: {problem}") from None
    except ValueError as err:  # a value YAML matched but Python refuses: 2024-13-45, a 5000-digit number
        raise UserError(f"{path}: a value cannot be read ({one_line(err, 160)}); quote it to make it a "
                        "string, or correct it") from None
    except RecursionError:
        raise UserError(f"{path}: lists or mappings nested too deeply for the YAML parser; a profile is sections "
                        "of keys and values (see profiles/demo.yaml)") from None


def _find_profile(path: Path) -> Path:
    """The file itself, else a shipped profile of that name (`demo`, `demo.yaml`, `profiles/demo.yaml`
    work from any directory once the package is installed)."""
    if _is_file(path):
        return path
    shipped_dir = profiles_dir()
    for name in (path.name, f"{path.name}.yaml"):
        if _is_file(shipped_dir / name):
            return shipped_dir / name
    ready = ", ".join(sorted(p.stem for p in shipped_dir.glob("*.yaml")))
    text = str(path)
    shown = text if text.isprintable() and len(text) <= 120 else repr(text)[:120] + "…"
    raise UserError(f"profile not found: {shown} (ready profiles: {ready}; or write one with `lowmem-tune plan -o`)")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system: no such file
        return False


def profile_from_dict(raw: dict[str, Any], source: str = "profile") -> Profile:
    profile = build(Profile, with_defaults(raw, StrategySection.name, StrategySection.optimizer), source)
    _check_strategy_keys(raw, source)
    s = profile.strategy
    wrong = optimizer_error(s)
    if wrong:
        raise UserError(f"{source}: {wrong}")
    runs_galore = s.name == "galore" or (s.name in LAYER_SAMPLING + ("welore",) and s.optimizer == "galore")
    if runs_galore and s.proj_type == "full" and s.svd == "sketch":  # fira takes the exact SVD whatever svd says
        raise UserError(f"{source}: strategy.proj_type full needs strategy.svd exact or randomized (the sketch "
                        "builds one-sided projectors, and svd sketch is the default); set strategy.svd or choose "
                        "another proj_type")
    if len(profile.train.betas) != 2:
        raise UserError(f"{source}: train.betas: expected two numbers in [0, 1), got {profile.train.betas}")
    if not profile.output.dir:
        raise UserError(f"{source}: output.dir: must name a directory")
    _check_chat_template(profile.data.chat_template, source)
    return profile


def _check_chat_template(value: str | None, source: str) -> None:
    """data.chat_template names a shipped template or a file that is there (whether that file is a
    usable Jinja template is checked where it is read, in data/chat.py)."""
    if value is None:
        return
    names = chat_template_names()
    choices = f"shipped: {', '.join(names)}; or a path to a Jinja file"
    shown = value if value.isprintable() and len(value) <= 80 else repr(value)[:80] + "…"
    if value in names:
        return
    if not value.strip():
        raise UserError(f"{source}: data.chat_template: empty; name a template ({choices})")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user of no such user
        path = Path(value)
    if _is_file(path):
        return
    if any(c in value for c in "/\\.~"):  # a path
        raise UserError(f"{source}: data.chat_template: no such file: {shown} ({choices})")
    close = difflib.get_close_matches(value, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"{source}: data.chat_template: unknown template {shown!r}{hint} ({choices})")


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
        except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or a value Python refuses): the text
            parsed = value
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise UserError(f"--set {item!r}: section {parts[0]!r} is not a mapping in the profile")
        section[parts[1]] = parsed
