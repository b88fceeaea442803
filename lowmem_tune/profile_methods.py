"""What differs by method in a profile's strategy section: the method names and their groups, the
rank and scale defaults that are a method's own, and the checks of `optimizer:` inside LISA /
OwLore / WeLore. profile.py applies them when a profile is loaded (a leaf: it imports nothing of
the package)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from lowmem_tune.profile import StrategySection

APOLLO = ("apollo", "apollo-mini")
"""APOLLO (channel-wise scaling) and APOLLO-Mini (rank 1, tensor-wise): also `optimizer:` choices
inside LISA and OwLore."""
STRATEGY_NAMES = ("full", "adamw8bit", "galore", "fira", "apollo", "apollo-mini", "lisa", "owlore", "welore", "lora",
                  "qlora", "dora")
"""Every strategy, by the name a profile gives in `strategy.name`: the one list the registry, the
planner and the CLI take theirs from."""

GALORE_INSIDE = ("galore", "fira", "lisa", "owlore", "welore")
"""Strategies that run GaLore (for LISA / OwLore / WeLore: with `optimizer: galore`, the default)."""
LOW_RANK_INSIDE = GALORE_INSIDE + APOLLO  # through a projected optimizer: GaLore's or APOLLO's
LAYER_SAMPLING = ("lisa", "owlore")
INT8_CAPABLE = ("galore", "fira", "apollo", "apollo-mini", "lisa", "owlore", "welore")
"""Strategies that can train with INT8 decoder weights (LISA / OwLore: GaLore or APOLLO inside; WeLore: GaLore)."""
ADAPTERS = ("lora", "qlora", "dora")  # peft, on a frozen base: not full-parameter, listed apart by the planner
FULL_PARAMETER = tuple(name for name in STRATEGY_NAMES if name not in ADAPTERS)
INSIDE_OPTIMIZERS = ("galore",) + APOLLO + ("adamw", "adamw8bit")
"""`strategy.optimizer`: inside LISA and OwLore (any), for WeLore's factors (not APOLLO)."""
InsideOptimizer = Literal[INSIDE_OPTIMIZERS]  # type: ignore[valid-type]
INT8_OPTIMIZERS = ("galore",) + APOLLO
"""`optimizer:` choices that write INT8 weights (LISA, OwLore; WeLore takes galore only)."""
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # APOLLO's paper and apollo-torch: rank 256 at 7B scale, scale 1 (the projection is random, so
    # a larger rank only makes the channel-wise scaling factor less noisy); its pretraining runs use
    # rank 1/4 of the hidden size, and min(rank, m, n) caps it for small models.
    "apollo": {"rank": 256, "scale": 1.0},
    # APOLLO-Mini: rank 1, one tensor-wise factor, scale sqrt(128) (the paper's alpha; apollo-torch
    # takes scale 128 and multiplies by its square root): a rank-1 estimate of the gradient's norm
    # ratio is smaller than the channel-wise one, which the scale makes up for.
    "apollo-mini": {"rank": 1, "scale": math.sqrt(128)},
}
"""Defaults of `rank` and `scale` that differ by method (StrategySection holds GaLore's), filled in
when a profile is loaded and omits them; inside LISA / OwLore those of `optimizer:`."""


def with_defaults(raw: dict[str, Any], default_name: str, default_optimizer: str) -> dict[str, Any]:
    """`raw` with the METHOD_DEFAULTS of its strategy (or of the optimizer inside LISA / OwLore) for
    the keys it omits."""
    section = raw.get("strategy")
    if not isinstance(section, dict):
        return raw
    name = section.get("name", default_name)
    method = section.get("optimizer", default_optimizer) if name in LAYER_SAMPLING else name
    defaults = METHOD_DEFAULTS.get(method) if isinstance(method, str) else None  # a wrong type: build says so
    if not defaults:
        return raw
    return {**raw, "strategy": {**defaults, **section}}


def replace_file_defaults(strategy: dict[str, Any], file_strategy: dict[str, Any], path: Any) -> str | None:
    """`--set strategy.name=X` on a file written for another method: the file's rank and scale (a
    GaLore profile's are not an APOLLO-Mini's) give way to X's own, unless --set gives them; the
    note that says so, if any."""
    name = str(strategy["name"])
    own = METHOD_DEFAULTS.get(name, {})
    replaced = [k for k in file_strategy if k in own and strategy.get(k) == file_strategy[k]]
    for key in replaced:
        del strategy[key]
    if not replaced:
        return None
    return (f"strategy.name={name} (--set): {name}'s own " + ", ".join(f"strategy.{k} {own[k]:g}" for k in replaced)
            + f" replace {path}'s (--set them to keep others)")


def optimizer_error(s: StrategySection) -> str | None:
    """What is wrong with the strategy's `optimizer:` choice, if anything (one line)."""
    if s.name == "welore" and s.optimizer in APOLLO:
        return (f"strategy.optimizer {s.optimizer} applies to lisa and owlore; welore trains its factors with "
                "galore, adamw or adamw8bit")
    if s.embedding_rank is not None and s.name in LAYER_SAMPLING and s.optimizer != "galore":
        return (f"strategy.embedding_rank trains the embeddings through GaLore, which {s.name} runs with "
                f"optimizer: galore only (got optimizer {s.optimizer}); set it to null or use galore")
    if s.weight_bits == 8 and s.name in LAYER_SAMPLING + ("welore",) and s.optimizer not in INT8_OPTIMIZERS:
        return (f"strategy.weight_bits 8 with {s.name} needs strategy.optimizer: galore, apollo or apollo-mini "
                f"(INT8 weights take their updates; got optimizer {s.optimizer})")
    return None
