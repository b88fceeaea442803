"""INT8 decoder weights (strategy.weight_bits: 8): quantization, updates below a code step,
the compute copy's lifetime, exact resume, a plain final model, and the errors."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from lowmem_tune.cli import main
from lowmem_tune.errors import UserError
from lowmem_tune.optim import StochasticRounding
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.quantize import Int8Linear, int8_layers
from lowmem_tune.train import RunControl, run_training
from lowmem_tune.train.run import TrainingRun


class _Quiet:
    def emit(self, event) -> None:
        pass


def int8_profile(out, **train) -> dict:
    return {
        "model": {"name": "tiny-llama", "init": "random"}, "hardware": {"device": "cpu"},
        "strategy": {"name": "galore", "rank": 8, "update_proj_gap": 2, "weight_bits": 8, "group_size": 16},
        "data": {"dataset": "synthetic-boolq", "num_examples": 64, "max_seq_len": 48, "heldout": 0},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 3e-3, "scheduler": "constant", "save_every": 3,
                  "seed": 5, "activation_checkpointing": False, **train},
        "output": {"dir": str(out)},
    }


def test_quantization_round_trips_within_half_a_code_step_and_matches_the_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24, bias=True)
    quantized = Int8Linear.from_linear(linear, group_size=16)
    step = quantized.scales.repeat_interleave(16, dim=1)
    assert quantized.codes.dtype == torch.int8 and quantized.scales.shape == (24, 4)
    assert torch.all((quantized.dequantized_weight() - linear.weight).abs() <= step / 2 + 1e-7)
    x = torch.randn(3, 64, requires_grad=True)
    reference = torch.nn.functional.linear(x, quantized.dequantized_weight(), linear.bias)
    torch.testing.assert_close(quantized(x), reference)
    quantized(x).square().sum().backward()
    assert quantized.weight.grad.shape == (24, 64) and quantized.weight.untyped_storage().nbytes() == 4
    assert set(quantized.state_dict()) == {"codes", "scales", "bias"}


def _one_group_per_row(seed: int = 0) -> Int8Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight.uniform_(-1, 1)
    return Int8Linear.from_linear(linear, group_size=256)


@pytest.mark.parametrize("rounding", [StochasticRounding(0), None])
def test_an_update_a_tenth_of_a_code_step_moves_the_weights_only_when_rounded_stochastically(rounding):
    """200 updates of a tenth of a code step towards zero (no group outgrows its scale)."""
    quantized = _one_group_per_row()
    step = quantized.scales.clone()  # (64, 1): one group per row
    before = quantized.dequantized_weight().clone()
    sign = before.sign()
    for _ in range(200):  # w <- w - lr * update, lr * update = step / 10 towards zero
        quantized.apply_update(lambda start, rows: (sign.narrow(0, start, rows) * step.narrow(0, start, rows)) / 10,
                               1.0, 0.0, rounding)
    assert torch.equal(quantized.scales, step)
    moved = ((before - quantized.dequantized_weight()) * sign / step)[before.abs() > 21 * step]  # not past zero
    if rounding is None:
        assert torch.count_nonzero(moved) == 0  # a tenth of a step rounds back every time
    else:
        assert float(moved.mean()) == pytest.approx(20.0, rel=0.05)  # 200 x 0.1 steps, in expectation


def test_a_weight_pushed_past_its_groups_range_grows_the_scale_with_headroom():
    quantized = _one_group_per_row()
    step = quantized.scales.clone()
    top = quantized.dequantized_weight().abs().argmax(dim=1)  # the value at the edge of each row's range
    push = torch.zeros(64, 256)
    push[torch.arange(64), top] = -3 * step[:, 0] * quantized.dequantized_weight()[torch.arange(64), top].sign()
    before = quantized.dequantized_weight()[torch.arange(64), top].clone()
    quantized.apply_update(lambda start, rows: push.narrow(0, start, rows), 1.0, 0.0, None)
    after = quantized.dequantized_weight()[torch.arange(64), top]
    assert torch.all(quantized.scales > step)
    assert torch.all(quantized.codes.abs().amax(dim=1) <= 121)  # headroom left at the edge
    torch.testing.assert_close(after.abs(), before.abs() + 3 * step[:, 0], atol=float(quantized.scales.max()), rtol=0)


def test_a_group_whose_values_shrink_below_half_its_range_gets_a_finer_grid():
    """Rows whose values all shrink to a quarter are rescaled (and then round to a grid four times
    finer than the old one); rows shrunk by a third keep their scale and every code they had."""
    quantized = _one_group_per_row()
    step = quantized.scales.clone()
    before = quantized.dequantized_weight().clone()
    shrink = torch.where(torch.arange(64)[:, None] < 32, 0.75, 1 / 3) * before  # rows 0-31 to a quarter
    codes = quantized.codes.clone()
    quantized.apply_update(lambda start, rows: shrink.narrow(0, start, rows), 1.0, 0.0, None)
    after = quantized.dequantized_weight()
    assert torch.all(quantized.scales[:32] < step[:32] / 3)
    assert torch.all(quantized.codes[:32].abs().amax(dim=1) >= 119)  # the range fits the values again
    assert torch.all((after[:32] - before[:32] / 4).abs() <= quantized.scales[:32] / 2 + 1e-7)
    assert torch.equal(quantized.scales[32:], step[32:])
    torch.testing.assert_close(after[32:], (codes[32:].float() * 2 / 3).round() * step[32:], atol=0, rtol=0)


def test_the_compute_copy_of_a_weight_lives_only_inside_its_layer(monkeypatch):
    """Through a whole forward and backward of a 2-layer model, at most one dequantized weight is
    alive at any time, and none is left afterwards."""
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import load_model
    from lowmem_tune.quantize import quantize_decoder

    model = load_model(resolve_model("tiny-llama"), "random", torch.float32, torch.device("cpu"), seed=0)
    quantize_decoder(model, 16, torch.device("cpu"))
    alive: set[int] = set()
    peak = []
    original = Int8Linear.dequantized

    def tracked(self, dtype, start=0, rows=None):
        copy = original(self, dtype, start, rows)
        key = id(copy)
        alive.add(key)
        weakref.finalize(copy, alive.discard, key)
        peak.append(len(alive))
        return copy

    monkeypatch.setattr(Int8Linear, "dequantized", tracked)
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(peak) == 2 * 14 and max(peak) == 1 and not alive
    assert all(m.weight.untyped_storage().nbytes() == 4 for m in int8_layers(model).values())


def test_resume_with_int8_weights_is_bit_identical_and_final_is_a_plain_model(tmp_path):
    run_training(profile_from_dict(int8_profile(tmp_path / "straight")), False, _Quiet(), RunControl())
    run_training(profile_from_dict(int8_profile(tmp_path / "stopped", max_steps=3)), False, _Quiet(), RunControl())
    run = TrainingRun(profile_from_dict(int8_profile(tmp_path / "stopped")), True, _Quiet(), RunControl())
    try:
        run.setup()
        handles = int8_layers(run.model)
        assert len(handles) == 14 and all(h.untyped_storage().nbytes() == h.element_size() for h in handles)
        run.train()
    finally:
        run.cleanup()

    def losses(path):
        return [json.loads(line)["loss"] for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    checkpoint = load_file(str(tmp_path / "stopped" / "checkpoints" / "step-6" / "model.safetensors"))
    assert checkpoint["model.layers.0.mlp.down_proj.codes"].dtype == torch.int8
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "stopped" / "final")
    down = final.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and tuple(down.weight.shape) == (64, 176)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy, message", [
    ({"name": "galore", "weight_bits": 4}, "strategy.weight_bits: 4 is not one of: 16, 8"),
    ({"name": "full", "weight_bits": 8}, "strategy.weight_bits does not apply to strategy full"),
    ({"name": "adamw8bit", "weight_bits": 8}, "strategy.weight_bits does not apply to strategy adamw8bit"),
    ({"name": "welore", "weight_bits": 8, "optimizer": "adamw"}, "needs strategy.optimizer: galore"),
    ({"name": "lisa", "weight_bits": 8, "optimizer": "adamw"}, "needs strategy.optimizer: galore"),
])
def test_bad_int8_settings_are_one_line_errors(tmp_path, strategy, message):
    import yaml

    raw = int8_profile(tmp_path / "run")
    raw["strategy"] = strategy
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["run", str(path), "--headless"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_a_row_the_group_size_does_not_divide_ends_in_a_shorter_group():
    """24-wide rows in groups of 16: a group of 16 and one of 8, each with its own scale; updates
    keep the codes of the short group on its grid as for a whole one (as a WeLore left factor's
    rank-wide rows need)."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 10, bias=False)
    with torch.no_grad():
        linear.weight[:, 16:] *= 0.01  # the short group's values are much smaller: its own scale
    quantized = Int8Linear.from_linear(linear, group_size=16)
    assert quantized.scales.shape == (10, 2) and quantized.codes.shape == (10, 24)
    torch.testing.assert_close(quantized.scales[:, 1], linear.weight[:, 16:].abs().amax(dim=1) / 127)
    step = torch.cat([quantized.scales[:, :1].expand(10, 16), quantized.scales[:, 1:].expand(10, 8)], dim=1)
    assert torch.all((quantized.dequantized_weight() - linear.weight).abs() <= step / 2 + 1e-9)
    codes = quantized.codes.clone()
    update = torch.zeros(10, 24)
    toward_zero = codes[:, 20].sign().float()
    update[:, 20] = 5 * step[:, 20] * toward_zero  # five code steps towards zero, in the short group only
    quantized.apply_update(lambda start, rows: update.narrow(0, start, rows), 1.0, 0.0, None)
    moved = quantized.codes.int() - codes.int()
    assert torch.equal(moved[:, 20], -5 * toward_zero.int()) and torch.count_nonzero(moved[:, :20]) == 0
    assert torch.count_nonzero(moved[:, 21:]) == 0
