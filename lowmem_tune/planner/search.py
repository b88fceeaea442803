"""Search strategies and their knobs for the best plan that fits, and turn a plan into a profile."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lowmem_tune.hardware import GpuTarget
from lowmem_tune.planner.architecture import Architecture
from lowmem_tune.planner.estimate import Estimate, Workload, estimate
from lowmem_tune.profile import ADAPTERS, APOLLO, FULL_PARAMETER, StrategySection
from lowmem_tune.profile_methods import METHOD_DEFAULTS

if TYPE_CHECKING:
    from lowmem_tune.profile import Profile

ORDER = {
    # full-parameter methods first (APOLLO after GaLore: its subspace is random, not the gradient's;
    # Mini's rank-1 statistics after APOLLO's), then layer sampling; WeLore (it removes rank) when
    # nothing else fits
    "quality": ("full", "adamw8bit", "fira", "galore", "apollo", "apollo-mini", "owlore", "lisa", "welore"),
    # fewest trained weights / cheapest steps first (APOLLO takes no SVD, but every matrix's full gradient)
    "speed": ("full", "adamw8bit", "lisa", "owlore", "apollo-mini", "apollo", "galore", "fira", "welore"),
    # re-sorted by total below
    "memory": FULL_PARAMETER,
}
"""The candidates `plan` chooses from without --strategy, in order of preference (welore's estimate
is of a model already compressed at the rank reduction it searches)."""
ADAPTER_ORDER = ("lora", "dora", "qlora")
"""Adapter methods, shown beside the others and named when no full-parameter method fits, never
chosen in their place (`--strategy lora` picks one): the most faithful first — a 16-bit base, then
DoRA's extra magnitudes, then the NF4 base."""
assert set(ADAPTER_ORDER) == set(ADAPTERS)
MICRO_BATCHES = (16, 8, 4, 2, 1)
TARGET_SEQUENCES_PER_STEP = 16
RANKS = {"quality": (256, 128), "speed": (128,), "memory": (128,)}
"""GaLore's and Fira's ranks; APOLLO's is its METHOD_DEFAULTS one (256, Mini 1), as in the paper."""
RANK_REDUCTIONS = (0.3, 0.5, 0.7)  # WeLore: the smallest that fits is chosen
SAMPLED_LAYERS = {"quality": (4, 2), "speed": (2, 1), "memory": (1,)}


@dataclass
class Candidate:
    estimate: Estimate
    workload: Workload
    fits: bool
    why: str

    @property
    def strategy(self) -> str:
        return self.estimate.strategy

    def settings(self) -> dict[str, Any]:
        return {**self.estimate.settings, "micro_batch_size": self.workload.micro_batch_size,
                "gradient_accumulation": self.workload.gradient_accumulation,
                "activation_checkpointing": self.workload.gradient_checkpointing}


def int8_group_size(arch: Architecture, limit: int = 256) -> int:
    """The largest group size up to `limit` that divides every decoder linear's input width (no row
    of a dense matrix then ends in a shorter group)."""
    width = math.gcd(*(lin.in_features for lin in arch.linears))
    return max(d for d in range(1, min(width, limit) + 1) if width % d == 0)


GIVE_UP = ((16, "full"), (16, "galore"), (8, "full"), (8, "galore"), (16, "frozen"), (8, "frozen"))
"""(weight bits, embeddings) in the order `--prefer quality` and `speed` give them up: GaLore on
the embeddings first, then INT8 weights (every weight still trains), then frozen embeddings (some
stop training). `--prefer memory` goes the other way."""


def _settings_grid(strategy: str, prefer: str, arch: Architecture) -> list[StrategySection]:
    """A strategy's configurations in order of preference."""
    if strategy in ("full", "adamw8bit") or strategy in ADAPTERS:
        return [StrategySection(name=strategy)]
    group = int8_group_size(arch)
    if strategy == "welore":  # removing rank gives up more than INT8 weights do: the smaller reduction first
        return [StrategySection(name=strategy, rank_reduction=x, weight_bits=bits, group_size=group)
                for x in RANK_REDUCTIONS for bits in (16, 8)]
    grid = []
    for bits, embeddings in GIVE_UP[::-1] if prefer == "memory" else GIVE_UP:
        if embeddings == "galore" and strategy in ("fira",) + APOLLO:
            continue  # Fira keeps full gradients: GaLore on the embeddings would save nothing; APOLLO has none
        if strategy in APOLLO:
            grid.append(StrategySection(name=strategy, **METHOD_DEFAULTS[strategy], weight_bits=bits, group_size=group,
                                        train_embeddings=False if embeddings == "frozen" else None))
            continue
        for knob in (RANKS if strategy in ("galore", "fira") else SAMPLED_LAYERS)[prefer]:
            rank = knob if strategy in ("galore", "fira") else StrategySection.rank
            base = {"rank": rank} if strategy in ("galore", "fira") else {"sampled_layers": knob}
            grid.append(StrategySection(name=strategy, **base, weight_bits=bits, group_size=group,
                                        train_embeddings=False if embeddings == "frozen" else None,
                                        embedding_rank=rank if embeddings == "galore" else None))
    return grid


def _workloads(seq_len: int, micro_batch: int | None, prefer: str, dtype_bytes: int, gpus: int,
               accumulate: bool = True) -> list[Workload]:
    """Micro batch sizes and checkpointing in order of preference, each accumulating up to
    TARGET_SEQUENCES_PER_STEP sequences a step (or, without `accumulate`, one micro-batch a step)."""
    sizes = (micro_batch,) if micro_batch else MICRO_BATCHES
    if prefer == "memory":
        sizes = tuple(sorted(sizes))
    grid = []
    for checkpointing in ((True,) if prefer == "memory" else (False, True)):
        for mb in sizes:
            accumulation = max(1, TARGET_SEQUENCES_PER_STEP // (mb * gpus)) if accumulate else 1
            grid.append(Workload(seq_len, mb, checkpointing, dtype_bytes, accumulation, gpus))
    # speed: no checkpointing beats a larger micro batch; otherwise the larger micro batch first
    return grid if prefer != "quality" else sorted(grid, key=lambda w: (-w.micro_batch_size, w.gradient_checkpointing))


def _strategy_workloads(strategy: str, seq_len: int, micro_batch: int | None, prefer: str, dtype_bytes: int,
                        gpus: int) -> list[Workload]:
    """APOLLO keeps every matrix's gradient while a step accumulates micro-batches (its update is
    the scaled gradient of the whole batch), so after the accumulating workloads it tries steps of
    one micro-batch, whose gradients it updates and frees in backward."""
    grid = _workloads(seq_len, micro_batch, prefer, dtype_bytes, gpus)
    if strategy in APOLLO:
        grid += [w for w in _workloads(seq_len, micro_batch, prefer, dtype_bytes, gpus, accumulate=False)
                 if w not in grid]
    return grid


def best_for(strategy: str, arch: Architecture, usable: int, seq_len: int, micro_batch: int | None,
             prefer: str, dtype_bytes: int, gpus: int = 1) -> Candidate:
    """The preferred fitting settings of one strategy, else its smallest configuration."""
    smallest: tuple[Estimate, Workload] | None = None
    for settings in _settings_grid(strategy, prefer, arch):
        for workload in _strategy_workloads(strategy, seq_len, micro_batch, prefer, dtype_bytes, gpus):
            est = estimate(settings, arch, workload)
            if est.total <= usable:
                return Candidate(est, workload, True, _why_fits(est, usable))
            if smallest is None or est.total < smallest[0].total:
                smallest = (est, workload)
    assert smallest is not None
    est, workload = smallest
    return Candidate(est, workload, False, _why_not(est, workload, usable))


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _why_fits(est: Estimate, usable: int) -> str:
    return f"fits: peak {_gib(est.total)} at the {est.phase} of {_gib(usable)} usable"


def _why_not(est: Estimate, workload: Workload, usable: int) -> str:
    parts = {k: v for k, v in est.memory.items() if k != "total"}
    biggest = sorted(parts, key=parts.get, reverse=True)[:2]
    return (f"does not fit even at micro batch {workload.micro_batch_size}"
            f"{' with checkpointing' if workload.gradient_checkpointing else ''}: {_gib(est.total)} > "
            f"{_gib(usable)} usable ({', '.join(f'{k} {_gib(parts[k])}' for k in biggest)})")


def nearest_fixes(arch: Architecture, gpu: GpuTarget, margin: float, seq_len: int, micro_batch: int | None,
                  prefer: str, strategy: str, gpus: int = 1) -> list[str]:
    """For a strategy that does not fit: the longest sequence that would, and the smallest card
    preset that would at this sequence length (WeLore's rank reduction and INT8 weights are in
    the search already: its smallest configuration uses them)."""
    from lowmem_tune.hardware import PRESETS, usable_bytes

    dtype_bytes = 2 if gpu.bf16 else 4
    usable = usable_bytes(gpu.total_bytes, margin, gpu.used_by_others_bytes)
    fixes = []
    shorter = seq_len // 2
    while shorter >= 64:
        if best_for(strategy, arch, usable, shorter, micro_batch, prefer, dtype_bytes, gpus).fits:
            fixes.append(f"--seq-len {shorter}")
            break
        shorter //= 2
    for name, preset in sorted(PRESETS.items(), key=lambda item: item[1].total_bytes):
        if preset.total_bytes <= gpu.total_bytes:
            continue
        room = usable_bytes(preset.total_bytes, margin)
        if best_for(strategy, arch, room, seq_len, micro_batch, prefer, 2 if preset.bf16 else 4, gpus).fits:
            fixes.append(f"--gpu {name} ({preset.total_bytes / 1024**3:.0f} GiB)")
            break
    return fixes


@dataclass
class SearchResult:
    candidates: list[Candidate]
    """One per strategy: the full-parameter ones, then the adapters (the pinned one only, with
    --strategy)."""
    chosen: Candidate | None
    adapter_instead: Candidate | None = None
    """When no full-parameter method fits: the adapter method that would (named, not chosen)."""


def search(arch: Architecture, gpu: GpuTarget, usable: int, seq_len: int, micro_batch: int | None,
           prefer: str, strategy: str | None, gpus: int = 1) -> SearchResult:
    """Every strategy's best candidate, and the one chosen among the full-parameter methods (or the
    pinned strategy)."""
    dtype_bytes = 2 if gpu.bf16 else 4

    def best(name: str) -> Candidate:
        return best_for(name, arch, usable, seq_len, micro_batch, prefer, dtype_bytes, gpus)

    if strategy:
        candidate = best(strategy)
        return SearchResult([candidate], candidate if candidate.fits else None)
    names = ORDER[prefer]
    candidates = [best(name) for name in names]
    adapters = [best(name) for name in ADAPTER_ORDER]
    fitting = [c for c in candidates if c.fits]
    fitting_adapters = [c for c in adapters if c.fits]
    if prefer == "memory":
        candidates.sort(key=lambda c: c.estimate.total)
        adapters.sort(key=lambda c: c.estimate.total)
        chosen = min(fitting, key=lambda c: c.estimate.total, default=None)
    else:  # what a configuration gives up comes before which method it is
        chosen = min(fitting, key=lambda c: (_given_up(c), names.index(c.strategy)), default=None)
    instead = None if chosen is not None or not fitting_adapters else fitting_adapters[0]
    return SearchResult(candidates + adapters, chosen, instead)


def _given_up(c: Candidate) -> int:
    """Where a fitting configuration is in GIVE_UP (WeLore, which removes rank, after all)."""
    if c.strategy == "welore":
        return len(GIVE_UP)
    s = c.estimate.settings
    embeddings = ("frozen" if s.get("train_embeddings") is False else
                  "galore" if s.get("embedding_rank") is not None else "full")
    return GIVE_UP.index((s.get("weight_bits", 16), embeddings))


# Recipes for the knobs the planner does not search. OwLore's published one (REFERENCE.md §3):
# K = 50, T = 100, scale 1.0, lr 3e-4. The adapters: the QLoRA paper's 2e-4 for 7B-13B models.
# GaLore, Fira, APOLLO and LISA scale their normalized update by 0.25, so at full finetuning's 1e-5 they
# barely move a pretrained model: on SST-2 (benchmarks/real_task.py, Gemma 3 270M) the dev part
# chose 1e-4 over 1e-5 for GaLore (91 % vs 68 %), APOLLO (91 % vs 80 %) and LISA, which runs GaLore
# inside its sampled layers (73 % vs 65 %); Fira's subspace update is GaLore's. APOLLO-Mini's dev part
# chose 1e-5 (85 % vs 73 %): it keeps the default.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "owlore": {"strategy": {"interval": 50, "update_proj_gap": 100, "scale": 1.0}, "train": {"lr": 3.0e-4}},
    **{name: {"train": {"lr": 1.0e-4}} for name in ("galore", "fira", "apollo", "lisa")},
    **{name: {"train": {"lr": 2.0e-4}} for name in ADAPTERS},
}


def build_profile(model: str, candidate: Candidate, gpu_spec: str, margin: float, seq_len: int,
                  output_dir: str | None = None) -> Profile:
    """A profile `run` accepts, with the chosen strategy, knobs and workload."""
    from lowmem_tune.profile import profile_from_dict

    s = candidate.estimate.settings
    w = candidate.workload
    strategy: dict[str, Any] = {"name": candidate.strategy}
    strategy.update({k: v for k, v in s.items() if k in ("rank", "bits", "layerwise", "sampled_layers", "optimizer",
                                                          "rank_reduction", "lora_rank")})
    if s.get("weight_bits") == 8:
        strategy.update(weight_bits=8, group_size=s["group_size"])
    strategy.update({k: s[k] for k in ("train_embeddings", "embedding_rank") if s.get(k) is not None})
    recipe = RECIPES.get(candidate.strategy, {})
    raw = {
        "model": {"name": model, "dtype": w.dtype},
        "hardware": {"gpu": gpu_spec, "margin": margin},
        "strategy": {**recipe.get("strategy", {}), **strategy},
        "data": {"dataset": "boolq", "max_seq_len": seq_len},
        "train": {"micro_batch_size": w.micro_batch_size, "gradient_accumulation": w.gradient_accumulation,
                  "activation_checkpointing": w.gradient_checkpointing, **recipe.get("train", {})},
        "output": {"dir": output_dir or f"runs/{model.replace('/', '-')}-{candidate.strategy}"},
        "eval": {"tasks": ["boolq"], "baseline": True},
    }
    return profile_from_dict(raw, source="plan")
