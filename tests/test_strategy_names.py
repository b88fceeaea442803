"""One list of strategies and one declaration of each knob: the registry, the profile schema, the
planner and the CLI agree, and a knob that the chosen strategy does not read is an error."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from click.testing import CliRunner

from lowmem_tune import profile as profile_module
from lowmem_tune.cli import main, plan
from lowmem_tune.errors import UserError
from lowmem_tune.planner.architecture import resolve_architecture
from lowmem_tune.planner.estimate import Workload, estimate
from lowmem_tune.planner.search import ORDER
from lowmem_tune.profile import STRATEGY_NAMES, StrategySection, load_profile, profile_from_dict, strategy_knobs
from lowmem_tune.schema import applies_to, bounds_of
from lowmem_tune.strategies import REGISTRY

UNBOUNDED = {"TrainSection.seed"}  # any integer is a seed


def test_registry_schema_planner_and_cli_take_the_same_names():
    assert tuple(REGISTRY) == STRATEGY_NAMES
    assert typing.get_args(typing.get_type_hints(StrategySection)["name"]) == STRATEGY_NAMES
    assert all(set(order) <= set(STRATEGY_NAMES) for order in ORDER.values())
    arch = resolve_architecture("demo-llama")
    for name in STRATEGY_NAMES:
        assert estimate(StrategySection(name=name), arch, Workload(64, 1, True)).total > 0
    choice = next(p for p in plan.params if p.name == "strategy").type
    assert tuple(choice.choices) == STRATEGY_NAMES
    for f in dataclasses.fields(StrategySection):
        assert applies_to(f) is None or set(applies_to(f)) <= set(STRATEGY_NAMES), f.name


def test_every_numeric_knob_has_its_range_beside_it():
    sections = [hint for hint in typing.get_type_hints(profile_module.Profile).values()]
    for section in sections:
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            kind = hints[f.name]
            numeric = kind in (int, float) or set(typing.get_args(kind)) & {int, float}
            numeric = numeric and typing.get_origin(kind) is not typing.Literal
            if numeric and f"{section.__name__}.{f.name}" not in UNBOUNDED:
                assert bounds_of(f) is not None, f"{section.__name__}.{f.name}"


@pytest.mark.parametrize("key, value", [("strategy.fira_limiter", 0.5), ("train.eps", 0), ("train.weight_decay", -0.1),
                                        ("strategy.temperature", 0), ("hardware.gpu_index", -1)])
def test_range_checks_name_the_key(key, value):
    section, name = key.split(".")
    raw = {section: {name: value}}
    if section == "strategy" and name == "fira_limiter":
        raw["strategy"]["name"] = "fira"
    if section == "strategy" and name == "temperature":
        raw["strategy"]["name"] = "owlore"
    with pytest.raises(UserError, match=rf"{key}: must be"):
        profile_from_dict(raw)


def test_a_knob_the_strategy_does_not_read_is_an_error_naming_who_reads_it(tmp_path):
    with pytest.raises(UserError, match=r"strategy.rank does not apply to strategy full \(it applies to: galore, fira"):
        profile_from_dict({"strategy": {"name": "full", "rank": 64}})
    with pytest.raises(UserError, match=r"strategy.interval does not apply to strategy galore .*lisa, owlore"):
        profile_from_dict({"strategy": {"name": "galore", "interval": 5}})
    path = tmp_path / "p.yaml"
    path.write_text("strategy: {name: welore, sampled_layers: 3}\n")
    result = CliRunner().invoke(main, ["run", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "strategy.sampled_layers does not apply" in lines[0]


def test_switching_the_strategy_with_set_drops_the_files_knobs_it_does_not_read_and_says_so():
    notes: list[str] = []
    switched = load_profile("demo", ["strategy.name=full"], notes)
    assert switched.strategy.name == "full"
    assert len(notes) == 1 and "strategy.rank" in notes[0] and "full does not read" in notes[0]
    assert set(switched.to_dict()["strategy"]) == set(strategy_knobs("full"))
    with pytest.raises(UserError, match="strategy.rank does not apply"):
        load_profile("demo", ["strategy.name=full", "strategy.rank=8"])  # asked for explicitly: an error
