"""bf16 weights on the CPU (what `model.dtype: auto` picks on a CPU with bf16 units): every strategy
trains, activation checkpointing on, and its weights move as the same run's fp32 weights do, to
within bf16's rounding. The norms' updates are a quarter of a bf16 step, so this is where the
stochastic-rounding writers earn their place: rounded to nearest, most of them vanish."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train import RunControl
from lowmem_tune.train.run import TrainingRun

STRATEGIES = {
    "full": {},
    "adamw8bit": {},
    "galore": {"rank": 8, "update_proj_gap": 4},
    "fira": {"rank": 8, "update_proj_gap": 4},
    "apollo": {"rank": 8, "update_proj_gap": 4},
    "apollo-mini": {"update_proj_gap": 4},
    "lisa": {"sampled_layers": 1, "interval": 3},
    "owlore": {"sampled_layers": 1, "interval": 3, "rank": 8, "update_proj_gap": 4, "calibration_samples": 4,
               "calibration_seq_len": 16},
    "welore": {"rank_reduction": 0.3},
}


class _Quiet:
    def emit(self, event) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """Both runs start from these float32 weights: a random init drawn in each dtype would differ
    (it does under torch 2.6 / transformers 5.0)."""
    from transformers import AutoModelForCausalLM

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.data import train_local_tokenizer

    torch.manual_seed(0)
    source = tmp_path_factory.mktemp("tiny") / "model"
    AutoModelForCausalLM.from_config(resolve_model("tiny-llama").config).save_pretrained(source)
    train_local_tokenizer(["is the red box empty? no, it holds 3 coins"] * 50, 200).save_pretrained(source)
    return source


def _moves(tmp_path, model: Path, strategy: str, dtype: str) -> dict[str, torch.Tensor]:
    profile = profile_from_dict({
        "model": {"name": str(model), "dtype": dtype}, "hardware": {"device": "cpu"},
        "strategy": {"name": strategy, **STRATEGIES[strategy]},
        "data": {"dataset": "synthetic-boolq", "num_examples": 64, "max_seq_len": 48, "heldout": 0},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 2e-3, "scheduler": "constant", "warmup_steps": 0,
                  "seed": 3, "save_every": 1000, "activation_checkpointing": True},
        "eval": {"tasks": []},
        "output": {"dir": str(tmp_path / dtype), "save_final": False},
    })
    run = TrainingRun(profile, False, _Quiet(), RunControl())
    try:
        run.setup()
        before = _weights(run.model)
        assert run.train().status == "completed"
        return {n: w - before[n] for n, w in _weights(run.model).items()}
    finally:
        run.cleanup()


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor in float32; a WeLore component as its product left · right (an SVD's
    factors are defined up to sign, and fp32 and bf16 weights may take opposite ones)."""
    params = {n: p.detach().float() for n, p in model.named_parameters()}
    out = {}
    for name, value in params.items():
        if name.endswith(".left"):
            out[name.removesuffix(".left")] = value @ params[name.removesuffix("left") + "right"]
        elif not name.endswith(".right"):
            out[name] = value.clone()
    return out


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_bf16_weights_move_as_fp32_weights_do(tmp_path, tiny_model, strategy):
    fp32 = _moves(tmp_path, tiny_model, strategy, "float32")
    bf16 = _moves(tmp_path, tiny_model, strategy, "bfloat16")
    moved = [n for n, d in fp32.items() if d.norm() > 0]
    assert moved and [n for n, d in bf16.items() if d.norm() > 0] == moved  # the same tensors train
    for name in moved:
        a, b = fp32[name].flatten(), bf16[name].flatten()
        # bf16 forward and backward change the gradients a little and stochastic rounding adds
        # noise, but no bias: bf16's change regressed on fp32's has slope ~1 (rounding to nearest
        # gave 0.0-0.2 on the norms, whose updates are a quarter of a bf16 step)
        slope = float(a @ b / (a @ a))
        assert 0.7 < slope < 1.3, (name, slope)
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.5, name
