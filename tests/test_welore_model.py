"""WeLore models: surgery, logits after compression, save / load / merge, `compress` and `merge`,
and the `welore` strategy (trainable set, optimizer, final save, fake-tensor planning)."""

from __future__ import annotations

import copy
import json

import pytest

import torch
from click.testing import CliRunner
from torch import nn
from transformers import AutoModelForCausalLM

from lowmem_tune.catalog import CATALOG, resolve_model
from lowmem_tune.cli import main
from lowmem_tune.compress import (
    LowRankLinear,
    assumed_ranks,
    compress_model,
    decoder_matrices,
    lowrank_modules,
    save_compressed,
    save_merged,
)
from lowmem_tune.compress import spectra as spectra_module
from lowmem_tune.modeling import load_model
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.strategies import build_strategy
from lowmem_tune.strategies.base import StrategyContext
from tests.test_welore import plant_low_rank, tiny_llama

CPU = torch.device("cpu")


def token_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def welore_profile(tmp_path, **strategy) -> object:
    return profile_from_dict({
        "model": {"name": "tiny-llama", "init": "random", "dtype": "float32"},
        "strategy": {"name": "welore", "optimizer": "adamw", "rank_reduction": 0.5, **strategy},
        "train": {"lr": 1e-2, "max_grad_norm": None},
        "output": {"dir": str(tmp_path / "run")},
    })


def test_full_rank_factorization_is_exact():
    linear = nn.Linear(24, 40, bias=True)
    factored = LowRankLinear.from_linear(linear, rank=24)
    x = torch.randn(5, 24)
    torch.testing.assert_close(factored(x), linear(x), atol=1e-5, rtol=1e-5)
    assert factored.left.shape == (40, 24) and factored.right.shape == (24, 24)
    # √S in both factors: their column / row norms are equal.
    torch.testing.assert_close(factored.left.norm(dim=0), factored.right.norm(dim=1))


def test_small_target_keeps_logits_close_to_the_dense_model(tmp_path):
    # Planted rank-8 + noise (1e-4) matrices: at ERR 0.1 only noise directions are dropped.
    # Tolerance: relative Frobenius error of the logits below 2e-3, and no larger than the largest
    # relative change of a compressed weight matrix; identical argmax at every position.
    dense = tiny_llama()
    plant_low_rank(dense, noise=1e-4)
    compressed = copy.deepcopy(dense)
    plan = compress_model(compressed, 0.1, 0.5, tmp_path, progress=False)
    assert plan.lrc_count > 0 and all(r.rank >= 8 for r in plan.matrices if r.lrc)
    weight_change = max(
        ((module.dense_weight() - dense.get_submodule(name).weight).norm() / dense.get_submodule(name).weight.norm())
        for name, module in lowrank_modules(compressed).items()
    ).item()
    ids = token_batch()
    ref, got = logits(dense, ids), logits(compressed, ids)
    logit_change = ((got - ref).norm() / ref.norm()).item()
    assert logit_change < 2e-3
    assert logit_change <= weight_change
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_saved_compressed_model_loads_through_load_model_and_merges_to_plain_transformers(tmp_path):
    model = tiny_llama()
    plan = compress_model(model, 0.5, 0.5, tmp_path / "cache", progress=False)
    ids = token_batch()
    factorized = logits(model, ids)

    save_compressed(model, plan, tmp_path / "compressed")
    config = json.loads((tmp_path / "compressed" / "config.json").read_text())
    assert config["welore"]["ranks"] == plan.lrc_ranks
    table = json.loads((tmp_path / "compressed" / "welore.json").read_text())
    assert len(table["matrices"]) == 14 and sum(row["lrc"] for row in table["matrices"]) == plan.lrc_count

    loaded = load_model(resolve_model(str(tmp_path / "compressed")), "pretrained", torch.float32, CPU)
    assert set(lowrank_modules(loaded)) == set(plan.lrc_ranks)
    torch.testing.assert_close(logits(loaded, ids), factorized, atol=0, rtol=0)

    # Merged-dense equals factorized up to float32 rounding (x·(LR)ᵀ vs (x·Rᵀ)·Lᵀ): atol 1e-5.
    save_merged(loaded, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert "welore" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert not lowrank_modules(merged)
    torch.testing.assert_close(logits(merged, ids), factorized, atol=1e-5, rtol=1e-4)


def test_compress_and_merge_commands(tmp_path):
    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    runner = CliRunner()
    result = runner.invoke(main, ["compress", "--model", str(tmp_path / "dense"), "--rank-reduction", "0.3",
                                  "-o", str(tmp_path / "c"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "c" / "welore.json").read_text())
    assert abs(table["rank_reduction_achieved"] - 0.3) <= 0.005
    compressed = load_model(resolve_model(str(tmp_path / "c")), "pretrained", torch.float32, CPU)
    ids = token_batch()

    result = runner.invoke(main, ["merge", str(tmp_path / "c"), "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, ids), logits(compressed, ids), atol=1e-5, rtol=1e-4)

    # --merge writes the dense model directly: same function as compress-then-merge.
    result = runner.invoke(main, ["compress", "--model", str(tmp_path / "dense"), "--rank-reduction", "0.3",
                                  "-o", str(tmp_path / "cm"), "--merge", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "cm", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(direct, ids), logits(merged, ids), atol=1e-5, rtol=1e-4)

    # An existing output is refused (exit 2, one line), and nothing is left behind.
    result = runner.invoke(main, ["compress", "--model", str(tmp_path / "dense"), "-o", str(tmp_path / "c")])
    assert result.exit_code == 2 and "already exists" in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    result = runner.invoke(main, ["compress", "--model", "tiny-llama", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "without weights" in result.output


def test_strategy_trains_only_factors_and_norms_and_saves_a_loadable_final(tmp_path):
    profile = welore_profile(tmp_path)
    strategy = build_strategy(profile)
    model = tiny_llama()
    ctx = StrategyContext(device=CPU, dtype=torch.float32, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    model = strategy.prepare_model(model, ctx)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lrc = lowrank_modules(model)
    assert lrc and trainable == {f"{n}.{f}" for n in lrc for f in ("left", "right")} | \
        {n for n, _ in model.named_parameters() if "norm" in n}
    info = strategy.describe()
    assert info["lrc"] == len(lrc) and info["n_lrc"] == 14 - len(lrc)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert info["trainable_parameters"] == info["factor_parameters"] + norms
    assert abs(info["rank_reduction_achieved"] - 0.5) <= 0.005 and info["tau"] is not None
    table = json.loads((tmp_path / "run" / "strategy.json").read_text())
    assert len(table["matrices"]) == 14

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    updater = strategy.build_updater(model, ctx)
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    updater.set_lr(1e-2)
    assert float(updater.step()["grad_norm"]) > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith(("left", "right")))

    strategy.save_final(model, tmp_path / "final")
    reloaded = load_model(resolve_model(str(tmp_path / "final")), "pretrained", torch.float32, CPU)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)
    # A resumed run recomputes the same ranks (cached spectra) and accepts the checkpoint's state.
    again = build_strategy(profile)
    again.prepare_model(tiny_llama(), ctx)
    again.load_state_dict(strategy.state_dict())


def test_strategy_norms_frozen_when_switched_off_and_compressed_model_knob(tmp_path):
    source = tiny_llama()
    plan = compress_model(source, 0.5, 0.5, tmp_path / "cache", progress=False)
    save_compressed(source, plan, tmp_path / "c")
    profile = welore_profile(tmp_path, train_norms=False, compressed_model=str(tmp_path / "c"))
    strategy = build_strategy(profile)
    ctx = StrategyContext(device=CPU, dtype=torch.float32, cache_dir=tmp_path / "cache")
    model = strategy.prepare_model(tiny_llama(seed=5), ctx)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"left", "right"}
    ids = token_batch()
    torch.testing.assert_close(logits(model, ids), logits(source, ids), atol=0, rtol=0)


def test_fake_tensor_planning_uses_assumed_ranks_without_svd(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_svd(*args, **kwargs):
        raise AssertionError("no SVD under plan --verify")

    monkeypatch.setattr(spectra_module, "compute_singular_values", no_svd)
    config = CATALOG["tiny-llama"].build_config()
    profile = profile_from_dict({"model": {"name": "tiny-llama"}, "strategy": {"name": "welore", "optimizer": "adamw"}})
    strategy = build_strategy(profile)
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config)
        ctx = StrategyContext(device=CPU, dtype=torch.float32, fake=True)
        model = strategy.prepare_model(model, ctx)
        ids = torch.zeros(1, 8, dtype=torch.long)
        model(ids, labels=ids).loss.backward()
    expected = assumed_ranks(config, 0.5, 0.5)
    assert {n: m.rank for n, m in lowrank_modules(model).items()} == expected.lrc_ranks
    assert strategy.describe()["source"] == "assumed"
    assert not decoder_matrices(model).keys() & expected.lrc_ranks.keys()


@pytest.mark.parametrize("optimizer", ["galore"])
def test_other_optimizers_update_only_the_trainable_set(tmp_path, optimizer):
    profile = welore_profile(tmp_path, optimizer=optimizer, rank=8, update_proj_gap=2)
    strategy = build_strategy(profile)
    ctx = StrategyContext(device=CPU, dtype=torch.float32, cache_dir=tmp_path / "cache")
    model = strategy.prepare_model(tiny_llama(), ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    updater = strategy.build_updater(model, ctx)
    for step in range(2):
        ids = token_batch(step)
        model(ids, labels=ids).loss.backward()
        updater.set_lr(1e-2)
        updater.step()
    updater.close()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
