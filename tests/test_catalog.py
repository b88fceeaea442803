"""The shipped architecture summaries agree with models built from each catalog config."""

from __future__ import annotations

import pytest

from lowmem_tune.catalog import CATALOG, count_parameters
from lowmem_tune.planner.architecture import resolve_architecture, spec_fingerprint, summarize
from lowmem_tune.planner.catalog_shapes import SHAPES


def test_llama2_7b_parameter_count():
    assert resolve_architecture("llama-2-7b").params == 6_738_415_616


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_shipped_summary_matches_a_meta_build(name):
    spec = CATALOG[name]
    config = spec.build_config()
    assert SHAPES[name]["fingerprint"] == spec_fingerprint(spec), "regenerate: python -m lowmem_tune.planner.architecture"
    shipped = resolve_architecture(name)
    assert shipped.params == count_parameters(config)
    assert shipped == summarize(name, config)
