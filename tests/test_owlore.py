"""OwLore: outlier ratios from calibration data, planted outliers, caching, the strategy and
`lowmem-tune inspect outliers`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_tune.cli import main
from lowmem_tune.layers import decoder_layers, layer_linears
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.strategies import build_strategy
from lowmem_tune.strategies.base import StrategyContext
from lowmem_tune.strategies.outliers import (
    DEFAULT_THRESHOLD,
    compute_outlier_ratios,
    input_column_norms,
    OutlierRatios,
    layer_outlier_counts,
    random_token_batches,
    sampling_probabilities,
)

LAYERS = 5
VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def calibration(n: int = 8, length: int = 16, seed: int = 0) -> list[torch.Tensor]:
    return random_token_batches(VOCAB, n, length, seed=seed)


def plant_outliers(model: LlamaForCausalLM, layer: int, channels=(3, 11), factor: float = 40.0) -> None:
    """Massive activations in a few hidden channels of one layer's inputs, as trained LLMs have:
    scale those channels in the layer's two RMSNorm gains (the inputs of q/k/v and gate/up)."""
    block = decoder_layers(model)[layer]
    with torch.no_grad():
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight[list(channels)] *= factor


def test_planted_outliers_rank_that_layer_first():
    model = tiny_llama()
    plant_outliers(model, layer=3)
    for threshold in (5.0, DEFAULT_THRESHOLD):
        result, _ = compute_outlier_ratios(model, calibration(), threshold, "test")
        ratios = torch.tensor(result.ratios)
        assert int(ratios.argmax()) == 3, (threshold, result.ratios)
        others = torch.cat([ratios[:3], ratios[4:]])
        assert ratios[3] > 2 * others.max()
        probabilities = sampling_probabilities(result)
        assert max(probabilities) == probabilities[3]


def test_unplanted_random_model_has_no_outliers_at_the_default_threshold():
    """Random weights have no heavy tails: at M = 13 no score passes, and the sampler goes uniform."""
    result, _ = compute_outlier_ratios(tiny_llama(), calibration(), DEFAULT_THRESHOLD, "test")
    assert result.ratios == [0.0] * LAYERS
    assert sampling_probabilities(result) == pytest.approx([1 / LAYERS] * LAYERS, abs=1e-15)


def test_column_norms_match_the_layer_inputs():
    """‖X_j‖ from the hooks equals the norm of RMSNorm(hidden state) computed independently."""
    model = tiny_llama()
    batches = calibration(n=4)
    norms = input_column_norms(model, batches)
    with torch.no_grad():
        hidden = [model(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
    for index, block in enumerate(decoder_layers(model)):
        x = torch.cat([block.input_layernorm(h[index]).reshape(-1, 32) for h in hidden])
        expected = x.norm(dim=0)
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(norms[(index, name)], expected)
    assert {name for (_, name) in norms} == set(layer_linears(decoder_layers(model)[0]))


def test_ratio_counts_scores_of_all_projections_together():
    model = tiny_llama()
    norms = input_column_norms(model, calibration())
    outliers, weights = layer_outlier_counts(model, norms, threshold=3.0)
    for index, block in enumerate(decoder_layers(model)):
        scores = torch.cat([(lin.weight.detach().abs() * norms[(index, name)]).flatten()
                            for name, lin in layer_linears(block).items()])
        above = int((scores > 3.0 * scores.double().mean()).sum())
        assert above > 0 and outliers[index] == above and weights[index] == scores.numel()


def _counts(outliers: list[int], weights: int = 998) -> OutlierRatios:
    return OutlierRatios(outliers, [weights] * len(outliers), 13.0, "test", 0, "")


def test_probabilities_follow_smoothed_outlier_shares():
    """p_l ∝ (outliers + 1) / (weights + 2): proportional to D_l when counts are large,
    never zero for a layer where no outlier was seen."""
    large = sampling_probabilities(_counts([9999, 19999, 39999], weights=10**7))
    assert large == pytest.approx([1 / 7, 2 / 7, 4 / 7], rel=1e-12)
    few = sampling_probabilities(_counts([0, 1, 7]))
    assert few == pytest.approx([1 / 11, 2 / 11, 8 / 11], rel=1e-12)
    assert sampling_probabilities(_counts([0, 0, 0, 0])) == [0.25] * 4


def test_temperature_flattens_probabilities():
    counts = _counts([9, 19, 39, 79])
    sharp = sampling_probabilities(counts, temperature=1.0)
    flat = sampling_probabilities(counts, temperature=4.0)
    assert sharp[3] / sharp[0] == pytest.approx(8.0)
    assert flat[3] / flat[0] == pytest.approx(8.0 ** 0.25)
    assert sum(flat) == pytest.approx(1.0)


def test_ratios_are_cached_per_weights_calibration_and_threshold(tmp_path, monkeypatch):
    import lowmem_tune.strategies.outliers as outliers

    model = tiny_llama()
    plant_outliers(model, layer=1)
    first, hit = compute_outlier_ratios(model, calibration(), 5.0, "test", tmp_path)
    assert not hit
    _, hit = compute_outlier_ratios(model, calibration(), 6.0, "test", tmp_path)
    assert not hit
    _, hit = compute_outlier_ratios(model, calibration(seed=1), 5.0, "test", tmp_path)
    assert not hit
    copy = tiny_llama()
    copy.load_state_dict(model.state_dict())  # the same weights, another object (another path on disk)
    measure = outliers.input_column_norms

    def not_again(*args, **kwargs):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(outliers, "input_column_norms", not_again)
    again, hit = compute_outlier_ratios(copy, calibration(), 5.0, "test", tmp_path)
    assert hit and again == first
    monkeypatch.setattr(outliers, "input_column_norms", measure)
    with torch.no_grad():  # weights changed in place (a folder overwritten by a later run): a new entry
        copy.model.layers[0].mlp.down_proj.weight.mul_(2)
    _, hit = compute_outlier_ratios(copy, calibration(), 5.0, "test", tmp_path)
    assert not hit
    assert len(list((tmp_path / "outliers").glob("*.json"))) == 4


def test_without_a_cache_directory_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    first, hit = compute_outlier_ratios(model, calibration(), 5.0, "test", None)
    again, hit_again = compute_outlier_ratios(model, calibration(), 5.0, "test", None)
    assert not hit and not hit_again and again == first and not any(tmp_path.rglob("*"))


def _owlore(tmp_path: Path, model: LlamaForCausalLM, **strategy):
    profile = profile_from_dict({
        "strategy": {"name": "owlore", "optimizer": "adamw", "sampled_layers": 1, "interval": 1,
                     "outlier_threshold": 5.0, "calibration_samples": 6, "calibration_seq_len": 16, **strategy},
        "train": {"seed": 3},
    })
    asked = []

    def calibration_batches(n: int, length: int):
        asked.append((n, length))
        yield from random_token_batches(VOCAB, n, length, seed=4)

    strat = build_strategy(profile)
    ctx = StrategyContext(device=torch.device("cpu"), dtype=torch.float32, run_dir=tmp_path,
                          calibration_batches=calibration_batches)
    strat.prepare_model(model, ctx)
    return strat, ctx, asked


def test_owlore_samples_the_outlier_layer_most(tmp_path):
    model = tiny_llama()
    plant_outliers(model, layer=2)
    strat, ctx, asked = _owlore(tmp_path, model)
    assert asked == [(6, 16)]
    updater = strat.build_updater(model, ctx)
    for step in range(40):
        strat.on_step_start(step, model, updater)
    counts = strat.sampler.counts
    assert max(range(LAYERS), key=counts.__getitem__) == 2
    summary = json.loads((tmp_path / "strategy.json").read_text())
    assert summary["name"] == "owlore" and summary["outlier_threshold"] == 5.0
    assert [row["outlier_ratio"] for row in summary["layers"]] == strat.choice.ratios.ratios
    assert [row["times_sampled"] for row in summary["layers"]] == counts
    assert abs(sum(row["probability"] for row in summary["layers"]) - 1) < 1e-9
    # a second run of the same model and calibration data reads the cache
    again, _, _ = _owlore(tmp_path, model)
    assert "cache" in again.choice.note and again.choice.ratios == strat.choice.ratios


def test_owlore_under_verify_skips_calibration(tmp_path):
    profile = profile_from_dict({"strategy": {"name": "owlore", "optimizer": "adamw"}})
    strat = build_strategy(profile)
    ctx = StrategyContext(device=torch.device("cpu"), dtype=torch.float32, fake=True,
                          calibration_batches=lambda n, length: (_ for _ in ()).throw(AssertionError("called")))
    strat.prepare_model(tiny_llama(), ctx)
    assert strat.choice.probabilities == [1 / LAYERS] * LAYERS


def test_inspect_outliers_prints_ratios_and_probabilities():
    result = CliRunner().invoke(main, ["inspect", "outliers", "--model", "tiny-llama", "--samples", "4",
                                       "--seq-len", "32", "--threshold", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "p(sample)" in result.output and "random weights" in result.output
    rows = [line for line in result.output.splitlines() if "%" in line and "│" in line]
    assert len(rows) == 2  # tiny-llama has two decoder layers


def test_inspect_outliers_rejects_a_bad_threshold():
    result = CliRunner().invoke(main, ["inspect", "outliers", "--model", "tiny-llama", "--threshold", "0.5",
                                       "--device", "cpu"])
    assert result.exit_code == 2 and "must be above 1" in result.output


def test_inspect_outliers_on_a_saved_model_prints_no_library_progress_bars(tmp_path):
    """A saved model makes transformers draw "Loading weights"; the command keeps it out of its
    table (a fresh process: the bars' switch is process-wide)."""
    import subprocess
    import sys

    from lowmem_tune.data import train_local_tokenizer

    source = tmp_path / "model"
    tiny_llama().save_pretrained(source)
    train_local_tokenizer(["the red box holds 3 coins"] * 40, 120).save_pretrained(source)
    result = subprocess.run([sys.executable, "-m", "lowmem_tune", "inspect", "outliers", "--model", str(source),
                             "--samples", "2", "--seq-len", "16", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "p(sample)" in result.stdout
    assert "Loading weights" not in result.stdout + result.stderr and "it/s" not in result.stderr
