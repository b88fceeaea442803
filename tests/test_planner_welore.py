"""The planner's torch-free WeLore ranks agree with compress.assumed_ranks on built models."""

from __future__ import annotations

from collections import Counter

import pytest

from lowmem_tune.catalog import resolve_model
from lowmem_tune.compress import ranks
from lowmem_tune.layers import build_empty_model
from lowmem_tune.planner import welore_ranks
from lowmem_tune.planner.architecture import resolve_architecture


def test_constants_match_the_heuristic():
    assert welore_ranks.ASSUMED_ORDER == ranks.ASSUMED_ORDER
    assert welore_ranks.ASSUMED_MAX_DROP == ranks.ASSUMED_MAX_DROP


@pytest.mark.parametrize("model", ["demo-llama", "tiny-llama", "llama-2-7b"])
def test_assumed_lrcs_match_assumed_ranks(model):
    built = build_empty_model(resolve_model(model).config)
    arch = resolve_architecture(model)
    # the default, a small target (edge layers of one type only), a large one (five types)
    for target, min_ratio in [(0.5, 0.5), (0.3, 0.5), (0.7, 0.4), (0.1, 0.05)]:
        plan = ranks.assumed_ranks_of(built, target, min_ratio)
        expected = Counter((m.name.rsplit(".", 1)[-1], m.rank) for m in plan.matrices if m.lrc)
        lrcs = welore_ranks.assumed_lrcs(arch, target, min_ratio)
        assert Counter({(x.linear.name, x.rank): x.layers for x in lrcs}) == expected, (target, min_ratio)
