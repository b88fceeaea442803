"""WeLore's assumed ranks (compress.ranks.assumed_ranks) by arithmetic on the architecture summary.

The planner must not import torch, and the heuristic reads only shapes and layer positions, so it
is restated here per projection type; tests/test_planner_welore.py checks it against
`assumed_ranks` on built models. Which edge layers a partially recruited type compresses does not
change memory, so only their number is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lowmem_tune.planner.architecture import Architecture, LinearShape
from lowmem_tune.planner.components import Workload

ASSUMED_ORDER = ("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "v_proj", "down_proj")
ASSUMED_MAX_DROP = 0.9


@dataclass(frozen=True)
class AssumedLrc:
    """One projection type's low-rank components: `layers` of the decoder layers hold it at `rank`."""

    linear: LinearShape
    rank: int
    layers: int


def _lrc_cap(full_rank: int, min_ratio: float) -> int:
    return max(1, math.ceil(full_rank * (1.0 - min_ratio) - 1e-9) - 1)


def assumed_lrcs(arch: Architecture, rank_reduction: float, min_ratio: float = 0.5) -> list[AssumedLrc]:
    """The LRCs `assumed_ranks` chooses for `arch`, per projection type (the rest stay dense)."""
    full = {lin.name: min(lin.out_features, lin.in_features) for lin in arch.linears}
    layers = arch.num_layers
    need = rank_reduction * layers * sum(full.values())
    kinds = [k for k in ASSUMED_ORDER if k in full] + sorted(set(full) - set(ASSUMED_ORDER))
    counts: dict[str, int] = {}
    drop = lambda: need / max(1, sum(full[k] * n for k, n in counts.items()))  # noqa: E731
    for kind in kinds:
        previous = dict(counts)
        counts[kind] = layers
        if drop() <= ASSUMED_MAX_DROP:
            if drop() <= min_ratio:  # too many matrices: the last type's edge layers only
                counts = previous
                counts[kind] = 0
                while counts[kind] < layers:
                    counts[kind] += 1
                    if drop() <= ASSUMED_MAX_DROP:
                        break
            break
    share = min(drop(), 1.0)
    by_name = {lin.name: lin for lin in arch.linears}
    return [AssumedLrc(by_name[k], min(_lrc_cap(full[k], min_ratio), max(1, round(full[k] * (1 - share)))), n)
            for k, n in counts.items() if n]


def welore_layer_extra(arch: Architecture, lrcs: list[AssumedLrc], w: Workload) -> int:
    """Activations the LRCs add over frozen layers (all layers summed): each LRC keeps its
    rank-k intermediate for the left factor's gradient, and its input for the right factor's
    (q/k/v share the attention norm's output, gate/up the MLP norm's; measured on fake tensors:
    d·h per norm output, one more d·h when gate and up both train, as in a trained layer)."""
    d, h = w.dtype_bytes, arch.hidden_size
    inputs = {"q_proj": ("attn", h), "k_proj": ("attn", h), "v_proj": ("attn", h),
              "o_proj": ("o", arch.q_dim), "gate_proj": ("gate", h), "up_proj": ("up", h),
              "down_proj": ("down", arch.intermediate_size)}
    total = 0
    for layer in range(arch.num_layers):
        here = [x for x in lrcs if layer < x.layers]  # which layers hold them does not matter here
        groups = {inputs[x.linear.name] for x in here if x.linear.name in inputs}
        total += sum(size for _, size in groups) + sum(x.rank for x in here)
    return total * d * w.tokens
