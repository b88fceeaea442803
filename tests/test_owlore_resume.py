"""Resume mid-interval through the real training loop: the same active layers, the same trajectory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train.run import run_training


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


@pytest.mark.parametrize("inside", ["galore", "adamw"])
def test_trainer_state_loads_on_the_cpu_and_each_component_places_its_own_tensors(tmp_path, inside):
    """On a GPU, loading straight onto the device put the sampler's generator state on CUDA (which
    `Generator.set_state` refuses) and brought offloaded state back onto the GPU. Here the model of
    the resumed run lives on the meta device, a stand-in for a GPU: moments must follow their
    parameters there, parked state must stay on the CPU, generators must get CPU ByteTensors."""
    from transformers import AutoModelForCausalLM

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.optim.offload import is_parked
    from lowmem_tune.strategies import StrategyContext, build_strategy
    from lowmem_tune.train.checkpoint import latest_checkpoint, load_trainer_state

    profile = profile_from_dict({
        # float32 as the meta model below (auto is bf16 on a CPU with bf16 units, where AdamW runs
        # through GaLore-AdamW to round stochastically: another updater, another state)
        "model": {"name": "demo-llama", "init": "random", "dtype": "float32"},
        "hardware": {"device": "cpu"},
        "strategy": {"name": "lisa", "sampled_layers": 1, "interval": 1, "optimizer": inside, "rank": 8,
                     "inactive_state": "offload"},
        "data": {"dataset": "synthetic-boolq", "num_examples": 64, "max_seq_len": 48},
        "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 3e-3, "save_every": 4, "eval_every": 100,
                  "activation_checkpointing": False, "seed": 3},
        "output": {"dir": str(tmp_path / "run")},
    })
    assert run_training(profile, False, _Quiet()).status == "completed"
    state = load_trainer_state(latest_checkpoint(tmp_path / "run" / "checkpoints"))

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from tensors(value)

    assert all(t.device.type == "cpu" for t in tensors(state))
    generator = state["strategy"]["sampler"]["generator"]
    assert generator.dtype == torch.uint8 and generator.device.type == "cpu"

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(resolve_model("demo-llama").config)
    strategy = build_strategy(profile)
    ctx = StrategyContext(device=torch.device("meta"), dtype=torch.float32)
    model = strategy.prepare_model(model, ctx)
    updater = strategy.build_updater(model, ctx)
    updater.load_state_dict(state["updater"])
    strategy.load_state_dict(state["strategy"])  # Generator.set_state takes the CPU ByteTensor
    assert strategy.sampler.active is not None

    parked = placed = 0
    if inside == "galore":
        for per_param in updater.optimizer.state.values():
            where = "cpu" if is_parked(per_param) else "meta"
            for value in per_param.values():
                if isinstance(value, torch.Tensor):
                    assert value.device.type == where
                    parked, placed = parked + (where == "cpu"), placed + (where == "meta")
    else:
        for per_param in updater.optimizer.state.values():
            assert per_param["exp_avg"].device.type == "meta"
            placed += 1
        for entry in updater.parked.values():
            assert all(t.device.type == "cpu" for t in tensors(entry))
            parked += 1
    assert parked > 0 and placed > 0  # both kinds were there to check
