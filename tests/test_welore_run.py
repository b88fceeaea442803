"""`run` with strategy welore end to end: compression at start, exact resume, a final model that
`load_model` (so `run` and `eval`) reads back."""

from __future__ import annotations

import json

import torch

from lowmem_tune.catalog import resolve_model
from lowmem_tune.compress import lowrank_modules
from lowmem_tune.modeling import load_model
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train import RunControl, run_training
from tests.test_train import Recorder, StopAfter, losses, tiny_profile


def welore_run(out, **train):
    return profile_from_dict(tiny_profile(out, strategy={"name": "welore", "optimizer": "adamw", "rank_reduction": 0.5},
                                          train={"max_steps": 4, "save_every": 100, **train}))


def test_welore_run_resumes_exactly_and_saves_a_loadable_compressed_final(tmp_path):
    outcome = run_training(welore_run(tmp_path / "ref"), resume=False, sink=Recorder())
    assert outcome.status == "completed"
    table = json.loads((tmp_path / "ref" / "strategy.json").read_text())
    assert abs(table["rank_reduction_achieved"] - 0.5) <= 0.005 and len(table["matrices"]) == 14

    control = RunControl()
    stopped = welore_run(tmp_path / "stopped")
    outcome = run_training(stopped, resume=False, sink=StopAfter(control, 2), control=control)
    assert outcome.status == "stopped" and outcome.step == 2
    outcome = run_training(stopped, resume=True, sink=Recorder())  # re-compresses from the cached spectra
    assert outcome.status == "completed"
    assert losses(tmp_path / "stopped") == losses(tmp_path / "ref")

    final = load_model(resolve_model(str(tmp_path / "ref" / "final")), "pretrained", torch.float32,
                       torch.device("cpu"))
    lrc = {m["name"]: m["rank"] for m in table["matrices"] if m["lrc"]}
    assert {name: module.rank for name, module in lowrank_modules(final).items()} == lrc
