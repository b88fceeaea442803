"""Resume mid-interval through the real training loop: the same active layers, the same trajectory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train.loop import run_training


class _Quiet:
    def emit(self, event) -> None:
        pass


def _profile(out_dir, max_steps: int, inactive_state: str):
    return profile_from_dict({
        "model": {"name": "demo-llama", "init": "random"},
        "hardware": {"device": "cpu"},
        "strategy": {"name": "owlore", "sampled_layers": 1, "interval": 2, "rank": 8, "update_proj_gap": 3,
                     "outlier_threshold": 4.0, "calibration_samples": 4, "calibration_seq_len": 32,
                     "inactive_state": inactive_state},
        "data": {"dataset": "synthetic-boolq", "num_examples": 64, "max_seq_len": 48},
        "train": {"max_steps": max_steps, "micro_batch_size": 4, "lr": 3e-3, "scheduler": "constant",
                  "save_every": 3, "eval_every": 100, "activation_checkpointing": False},
        "output": {"dir": str(out_dir)},
    })


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("inactive_state", ["drop", "offload"])
def test_resume_mid_interval_continues_the_identical_trajectory(tmp_path, inactive_state):
    """K = 2, so layers are drawn before steps 0, 2, 4; the checkpoint after 3 steps is mid-interval."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_training(_profile(straight, 6, inactive_state), False, _Quiet()).status == "completed"
    run_training(_profile(interrupted, 3, inactive_state), False, _Quiet())
    resumed = run_training(_profile(interrupted, 6, inactive_state), True, _Quiet())
    assert resumed.status == "completed"

    reference, continued = _metrics(straight), _metrics(interrupted)
    assert [m["step"] for m in continued] == list(range(1, 7))
    for ref, got in zip(reference, continued):
        assert got["active_layers"] == ref["active_layers"]
        assert got["loss"] == ref["loss"]
    a = load_file(next((straight / "final").glob("*.safetensors")))
    b = load_file(next((interrupted / "final").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((interrupted / "strategy.json").read_text())
    assert sum(row["times_sampled"] for row in summary["layers"]) == 3  # draws at steps 0, 2, 4
