"""WeLore rank selection: ERR targets, planted low-rank structure, the spectra cache, assumed ranks."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_tune.catalog import CATALOG
from lowmem_tune.compress import assumed_ranks, compress_model, decoder_matrices, plan_ranks, select_ranks
from lowmem_tune.compress import spectra as spectra_module
from lowmem_tune.compress.lowrank import LowRankLinear, lowrank_modules
from lowmem_tune.errors import UserError

PLANTED = ("q_proj", "k_proj", "o_proj", "gate_proj")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """catalog tiny-llama's shape: 2 layers, q/o 64×64, k/v 32×64, gate/up 176×64, down 64×176."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(CATALOG["tiny-llama"].build_config()).eval()


def plant_low_rank(model: LlamaForCausalLM, rank: int = 8, noise: float = 1e-3, seed: int = 1) -> None:
    """q, k, o, gate become rank-`rank` matrices (well-conditioned signal) plus small Gaussian noise;
    v, up, down keep their random full-rank init."""
    gen = torch.Generator().manual_seed(seed)
    for name, linear in decoder_matrices(model).items():
        if name.rsplit(".", 1)[-1] not in PLANTED:
            continue
        out_f, in_f = linear.weight.shape
        u, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=gen))
        signal = torch.linspace(1.0, 0.6, rank)
        with torch.no_grad():
            linear.weight.copy_(u @ torch.diag(signal) @ v.T + noise * torch.randn(out_f, in_f, generator=gen))


def _err_of_model(model) -> float:
    """ERR recomputed from the modules actually in the model (not from the plan)."""
    full = kept = 0
    lowrank = lowrank_modules(model)
    for name, linear in decoder_matrices(model).items():
        full += min(linear.weight.shape)
        kept += min(linear.weight.shape)
    for module in lowrank.values():
        full += min(module.in_features, module.out_features)
        kept += module.rank
    return 1 - kept / full


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_achieved_reduction_within_half_a_point_and_parameter_count_matches(target, tmp_path):
    model = tiny_llama()
    dense_params = sum(p.numel() for p in model.parameters())
    plan = compress_model(model, target, 0.5, tmp_path, progress=False)

    assert abs(plan.achieved - target) <= 0.005
    assert abs(_err_of_model(model) - target) <= 0.005
    assert _err_of_model(model) == pytest.approx(plan.achieved)
    # The parameters really removed are what the plan says, and each LRC drops more than min_ratio.
    assert sum(p.numel() for p in model.parameters()) == dense_params - plan.removed_parameters
    for row in plan.matrices:
        assert row.lrc == (row.dropped > 0.5)
        module = model.get_submodule(row.name)
        assert isinstance(module, LowRankLinear) == row.lrc
        if row.lrc:
            assert module.rank == row.rank


def test_planted_rank_8_is_lrc_at_rank_8_and_random_full_rank_is_n_lrc(tmp_path):
    model = tiny_llama()
    plant_low_rank(model)
    spectra = spectra_module.singular_values(model, tmp_path, progress=False)
    shapes = {n: tuple(m.weight.shape) for n, m in decoder_matrices(model).items()}

    # The planted matrices alone can supply exactly this reduction at rank 8: nothing else is touched.
    natural = sum(min(s) - 8 for n, s in shapes.items() if n.rsplit(".", 1)[-1] in PLANTED) / \
        sum(min(s) for s in shapes.values())
    plan = select_ranks(spectra, shapes, natural, 0.5)
    for row in plan.matrices:
        planted = row.name.rsplit(".", 1)[-1] in PLANTED
        assert row.lrc == planted, row
        assert row.rank == (8 if planted else row.full_rank), row

    # Asking for less keeps the signal and only some noise directions; the random ones stay dense.
    plan = select_ranks(spectra, shapes, natural - 0.05, 0.5)
    assert abs(plan.achieved - (natural - 0.05)) <= 0.005
    for row in plan.matrices:
        planted = row.name.rsplit(".", 1)[-1] in PLANTED
        assert row.lrc == planted, row
        if planted:
            assert 8 <= row.rank < row.full_rank / 2


def test_unreachable_target_is_a_user_error(tmp_path):
    model = tiny_llama()
    spectra = spectra_module.singular_values(model, tmp_path, progress=False)
    shapes = {n: tuple(m.weight.shape) for n, m in decoder_matrices(model).items()}
    with pytest.raises(UserError, match="out of reach"):
        select_ranks(spectra, shapes, 0.995, 0.5)


def test_spectra_are_cached_by_content_and_the_second_run_does_no_svd(tmp_path, monkeypatch):
    model = tiny_llama()
    first = plan_ranks(model, 0.5, 0.5, tmp_path, progress=False)
    cached = list((tmp_path / spectra_module.SPECTRA_DIR).glob("*.safetensors"))
    assert len(cached) == 1

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD ran although the spectra were cached")

    monkeypatch.setattr(spectra_module, "compute_singular_values", no_svd)
    second = plan_ranks(copy.deepcopy(model), 0.5, 0.5, tmp_path, progress=False)
    assert second == first

    # Different weights (same architecture) get their own entry: the key is the content.
    other = tiny_llama(seed=1)
    monkeypatch.undo()
    plan_ranks(other, 0.5, 0.5, tmp_path, progress=False)
    assert len(list((tmp_path / spectra_module.SPECTRA_DIR).glob("*.safetensors"))) == 2


def test_spectra_match_torch_svd():
    model = tiny_llama()
    spectra = spectra_module.compute_singular_values(model, progress=False)
    name, linear = next(iter(decoder_matrices(model).items()))
    torch.testing.assert_close(spectra[name], torch.linalg.svdvals(linear.weight.float()))
    assert all(torch.all(s[:-1] >= s[1:]) for s in spectra.values())


def test_assumed_ranks_llama2_7b_at_half_is_q_k_o_gate():
    config = CATALOG["llama-2-7b"].build_config()
    plan = assumed_ranks(config, 0.5, 0.5)
    assert plan.achieved == pytest.approx(0.5, abs=0.005)
    kinds = {row.name.rsplit(".", 1)[-1]: row for row in plan.matrices}
    assert {k for k, row in kinds.items() if row.lrc} == {"q_proj", "k_proj", "o_proj", "gate_proj"}
    assert plan.lrc_count == 4 * 32
    assert {row.rank for row in plan.matrices if row.lrc} == {512}  # 12.5% of 4096 kept
    # What the planner subtracts: q, k, o (4096×4096) and gate (11008×4096) at rank 512, in 32 layers.
    assert plan.removed_parameters == 32 * (3 * (4096 * 4096 - 512 * 8192) + (11008 * 4096 - 512 * 15104))


@pytest.mark.parametrize("name,target", [("llama-2-7b", 0.05), ("llama-2-7b", 0.7), ("llama-3-8b", 0.3),
                                         ("qwen2.5-0.5b", 0.1)])
def test_assumed_ranks_hit_the_target_and_respect_min_ratio(name, target):
    plan = assumed_ranks(CATALOG[name].build_config(), target, 0.5)
    assert plan.achieved == pytest.approx(target, abs=0.005)
    assert plan.lrc_count > 0
    assert all(row.dropped > 0.5 for row in plan.matrices if row.lrc)
    assert all(row.rank == row.full_rank for row in plan.matrices if not row.lrc)


def test_flat_spectrum_is_never_low_rank(tmp_path):
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32)
    model = LlamaForCausalLM(config)
    spectra = spectra_module.singular_values(model, tmp_path, progress=False)
    shapes = {n: tuple(m.weight.shape) for n, m in decoder_matrices(model).items()}
    q = next(n for n in shapes if n.endswith("q_proj"))
    spectra[q] = torch.ones(16)  # e.g. an orthogonal matrix: every direction equally strong
    plan = select_ranks(spectra, shapes, 0.3, 0.5)
    assert not next(r for r in plan.matrices if r.name == q).lrc
