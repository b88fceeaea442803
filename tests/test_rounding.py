"""Stochastic rounding: unbiased onto bf16, fp16 and integer grids; updates far below a bf16 ulp
move the weights by the expected amount with it and not at all without; resume stays exact."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem_tune.optim import GaLoreAdamW, GaLoreConfig, StochasticRounding
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train import RunControl, run_training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_16_bits_is_unbiased_and_lands_on_a_neighbour(dtype):
    values = torch.tensor([1.0003, -0.020007, 3.14159, 1e-3 + 1e-7, -7.7777], dtype=torch.float32)
    rounding = StochasticRounding(seed=0)
    draws = torch.stack([rounding.to_dtype(values, dtype) for _ in range(20000)])
    assert draws.dtype == dtype
    lo, hi = values.to(dtype), values.to(dtype)
    neighbours = torch.stack([torch.nextafter(values.to(dtype), torch.full_like(values, s).to(dtype)) for s in (-1e9, 1e9)])
    allowed = torch.cat([lo[None], hi[None], neighbours])
    assert ((draws[:, None, :] == allowed[None]).any(dim=1)).all()  # never further than a neighbour
    mean = draws.double().mean(dim=0)
    assert torch.all((mean - values.double()).abs() <= 1e-3 * values.double().abs())
    assert torch.all((mean - values.double()).abs() < (values.to(dtype).double() - values.double()).abs() + 1e-12)


def test_rounding_to_whole_numbers_is_unbiased():
    values = torch.tensor([0.1, 2.5, -3.9, 127.01], dtype=torch.float32)
    rounding = StochasticRounding(seed=1)
    draws = torch.stack([rounding.to_grid(values) for _ in range(20000)])
    assert torch.all(draws == draws.round()) and torch.all((draws - values).abs() < 1)
    assert torch.allclose(draws.double().mean(dim=0), values.double(), atol=1e-2)


def test_the_generator_state_replays_the_same_bits():
    first = StochasticRounding(seed=3)
    x = torch.rand(1000)
    first.to_dtype(x, torch.bfloat16)
    saved = first.state_dict()
    expected = first.to_dtype(x, torch.bfloat16)
    again = StochasticRounding(seed=99)
    again.load_state_dict(saved)
    assert torch.equal(again.to_dtype(x, torch.bfloat16), expected)


def test_a_process_on_another_device_of_the_same_type_resumes_the_saved_state():
    """Process 0 saves its generator's state; process 1 (cuda:1 in a real run: here the CPU under
    another device name in the saved state, as checkpoints before the fix named it) resumes that
    state rather than a fresh seed, so every process keeps drawing the same bits."""
    first = StochasticRounding(seed=3)
    x = torch.rand(1000)
    first.to_dtype(x, torch.bfloat16)
    saved = first.state_dict()
    expected = first.to_dtype(x, torch.bfloat16)
    renamed = {"seed": saved["seed"], "generators": {"cpu:0": saved["generators"]["cpu"]}}
    other = StochasticRounding(seed=3)
    other.load_state_dict(renamed)
    assert torch.equal(other.to_dtype(x, torch.bfloat16), expected)


ULP_AT_2_POW_MINUS_6 = 2.0 ** -13  # bf16 spacing in [2^-6, 2^-5): 0.02 lives there


@pytest.mark.parametrize("case", ["galore", "dense fp32 moments", "dense 8-bit moments"])
def test_updates_a_tenth_of_an_ulp_move_bf16_weights_only_with_stochastic_rounding(case):
    """400 steps of lr = ulp / 10 on bf16 weights of about 0.02 (gradients with a steady direction,
    so the moves add up): with stochastic rounding they move as the same optimizer moves float32
    weights (within 10%); rounded to nearest they do not move at all."""
    shape = (64, 96) if case == "galore" else (64 * 96,)
    torch.manual_seed(0)
    start = 0.02 + 0.004 * torch.rand(shape)
    steady = torch.randn(shape)
    grads = [steady + 0.3 * torch.randn(shape) for _ in range(400)]
    moved = {}
    for dtype, rounding in ((torch.float32, None), (torch.bfloat16, StochasticRounding(0)), (torch.bfloat16, None)):
        w = torch.nn.Parameter(start.to(dtype, copy=True))
        groups = [{"params": [w], "rank": 8, "update_proj_gap": 1000, "scale": 2.0}] if case == "galore" else [w]
        opt = GaLoreAdamW(groups, lr=ULP_AT_2_POW_MINUS_6 / 10,
                          config=GaLoreConfig(bits=8 if "8-bit" in case else 32, svd="exact"), rounding=rounding)
        for grad in grads:
            w.grad = grad.to(dtype)
            opt.step()
        moved[(dtype, rounding is not None)] = (w.detach().float() - start.to(dtype).float())
    reference = moved[(torch.float32, False)].abs().mean()
    assert reference > 10 * ULP_AT_2_POW_MINUS_6  # many ulps in all
    stochastic = moved[(torch.bfloat16, True)]
    assert abs(float(stochastic.abs().mean() / reference) - 1) < 0.1
    assert float(torch.nn.functional.cosine_similarity(stochastic.flatten(), moved[(torch.float32, False)].flatten(),
                                                       dim=0)) > 0.9
    assert torch.count_nonzero(moved[(torch.bfloat16, False)]) == 0


def test_resume_with_bf16_weights_and_stochastic_rounding_is_bit_identical(tmp_path):
    def raw(out, steps):
        return {
            "model": {"name": "tiny-llama", "init": "random", "dtype": "bfloat16"}, "hardware": {"device": "cpu"},
            "strategy": {"name": "galore", "rank": 8, "update_proj_gap": 2, "rounding": "stochastic"},
            "data": {"dataset": "synthetic-boolq", "num_examples": 64, "max_seq_len": 48, "heldout": 0},
            "train": {"max_steps": steps, "micro_batch_size": 4, "lr": 1e-4, "scheduler": "constant",
                      "save_every": 3, "seed": 2, "activation_checkpointing": False},
            "output": {"dir": str(out)},
        }

    class Quiet:
        def emit(self, event):
            pass

    run_training(profile_from_dict(raw(tmp_path / "straight", 6)), False, Quiet(), RunControl())
    run_training(profile_from_dict(raw(tmp_path / "stopped", 3)), False, Quiet(), RunControl())
    run_training(profile_from_dict(raw(tmp_path / "stopped", 6)), True, Quiet(), RunControl())

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
