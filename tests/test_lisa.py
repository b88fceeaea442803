"""Layer sampling (LISA, and the machinery OwLore shares): sampler statistics, bounded optimizer
state, freezing / unfreezing, offload, checkpoint round-trips and resume mid-interval."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_tune.layers import decoder_layers
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.strategies import build_strategy
from lowmem_tune.strategies.base import StrategyContext
from lowmem_tune.strategies.layer_sampling import LayerSampler

NUM_LAYERS = 6
INSIDE = {"adamw": {"optimizer": "adamw"}, "galore": {"optimizer": "galore", "rank": 4, "update_proj_gap": 5}}


def tiny_llama(seed: int = 0, layers: int = NUM_LAYERS) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def make_profile(**strategy):
    return profile_from_dict({
        "strategy": {"name": "lisa", "optimizer": "adamw", "sampled_layers": 2, "interval": 1, **strategy},
        "train": {"lr": 1e-2, "seed": 7, "weight_decay": 0.1},
    })


def setup(tmp_path=None, seed=0, **strategy):
    model = tiny_llama(seed)
    strat = build_strategy(make_profile(**strategy))
    ctx = StrategyContext(device=torch.device("cpu"), dtype=torch.float32, run_dir=tmp_path)
    model = strat.prepare_model(model, ctx)
    updater = strat.build_updater(model, ctx)
    return model, strat, updater


def train_step(step, model, strat, updater, data_seed=0):
    strat.on_step_start(step, model, updater)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(data_seed * 1000 + step))
    model(input_ids=ids, labels=ids).loss.backward()
    updater.set_lr(1e-2)
    updater.step()


def chi_square_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Upper tail of the chi-square statistic, P(χ²_{k-1} > x) = Q((k-1)/2, x/2)."""
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


# --------------------------------------------------------------------------- sampler statistics


def test_single_layer_frequencies_match_probabilities():
    probabilities = [0.05, 0.1, 0.15, 0.3, 0.4]
    sampler = LayerSampler(probabilities, sampled=1, seed=123)
    draws = 20000
    for step in range(draws):
        sampler.draw(step)
    counts = torch.tensor(sampler.counts, dtype=torch.float64)
    expected = torch.tensor(probabilities, dtype=torch.float64) * draws
    assert counts.sum() == draws
    assert chi_square_pvalue(counts, expected) > 1e-3
    # and the test has power: the same counts are far from uniform
    assert chi_square_pvalue(counts, torch.full_like(expected, draws / 5)) < 1e-12


def test_pairs_without_replacement_follow_successive_sampling():
    """γ = 2: each unordered pair {a, b} comes with probability p_a p_b/(1-p_a) + p_b p_a/(1-p_b)."""
    p = [0.05, 0.1, 0.15, 0.3, 0.4]
    sampler = LayerSampler(p, sampled=2, seed=5)
    pairs = list(itertools.combinations(range(5), 2))
    seen = dict.fromkeys(pairs, 0)
    draws = 20000
    for step in range(draws):
        seen[tuple(sampler.draw(step))] += 1
    exact = torch.tensor([p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b]) for a, b in pairs], dtype=torch.float64)
    assert abs(exact.sum().item() - 1) < 1e-12
    counts = torch.tensor([seen[pair] for pair in pairs], dtype=torch.float64)
    assert chi_square_pvalue(counts, exact * draws) > 1e-3
    assert sum(sampler.counts) == 2 * draws


def test_zero_probability_layers_are_never_drawn():
    sampler = LayerSampler([0.0, 0.5, 0.0, 0.5], sampled=3, seed=0)
    assert sampler.sampled == 2
    for step in range(50):
        assert sampler.draw(step) == [1, 3]


def test_sampler_state_round_trip_continues_the_same_sequence():
    a = LayerSampler([0.1, 0.2, 0.3, 0.4], sampled=2, seed=9)
    for step in range(5):
        a.draw(step)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = LayerSampler([0.1, 0.2, 0.3, 0.4], sampled=2, seed=0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.active == a.active and b.counts == a.counts and b.drawn_at == 4
    assert [a.draw(s) for s in range(5, 15)] == [b.draw(s) for s in range(5, 15)]


# --------------------------------------------------------------------------- the strategy


def test_lisa_samples_uniformly_and_keeps_embeddings_trainable():
    model, strat, updater = setup()
    assert strat.choice.probabilities == [1 / NUM_LAYERS] * NUM_LAYERS
    strat.on_step_start(0, model, updater)
    active = strat.step_metrics()["active_layers"]
    assert len(active) == 2
    for index, layer in enumerate(decoder_layers(model)):
        assert all(p.requires_grad == (index in active) for p in layer.parameters())
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        assert all(p.requires_grad for p in module.parameters())


def test_frozen_embeddings_when_switched_off():
    model, strat, updater = setup(train_embeddings=False)
    strat.on_step_start(0, model, updater)
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert len([p for p in model.parameters() if p.requires_grad]) == 2 * len(list(decoder_layers(model)[0].parameters()))


def _adamw_bytes(params) -> int:
    """Independent count: AdamW holds exp_avg and exp_avg_sq (fp32 here) and a scalar step per parameter."""
    return sum(2 * p.numel() * 4 + 4 for p in params)


@pytest.mark.parametrize("inside", INSIDE)
def test_optimizer_state_after_ten_resamplings_equals_after_one(inside):
    model, strat, updater = setup(**INSIDE[inside])
    train_step(0, model, strat, updater)
    after_one = updater.state_bytes()
    trained = [p for p in model.parameters() if p.requires_grad]
    if inside == "adamw":
        assert after_one == _adamw_bytes(trained)
    else:  # GaLore moments are rank-sized: less than AdamW's for the same parameters, but not zero
        assert 0 < after_one < _adamw_bytes(trained)
    ever_active = set(strat.applied)
    for step in range(1, 11):
        train_step(step, model, strat, updater)
        ever_active |= set(strat.applied)
        assert updater.state_bytes() == after_one
    # the test has teeth: more layers were sampled than fit in the state at once
    assert len(ever_active) > 2 * 2
    assert sum(strat.sampler.counts) == 11 * 2


@pytest.mark.parametrize("inside", INSIDE)
def test_layers_frozen_at_construction_train_when_sampled_and_rest_when_not(inside):
    """LMFlow #726: a layer frozen when the optimizer was built must still train once sampled.
    Weight decay is on, so an inactive layer touched by the optimizer would change too."""
    model, strat, updater = setup(interval=2, **INSIDE[inside])
    layers = decoder_layers(model)
    changed = set()
    for step in range(12):
        before = [torch.cat([p.detach().flatten() for p in layer.parameters()]).clone() for layer in layers]
        train_step(step, model, strat, updater)
        for index, layer in enumerate(layers):
            after = torch.cat([p.detach().flatten() for p in layer.parameters()])
            moved = not torch.equal(before[index], after)
            assert moved == (index in strat.applied), (step, index, strat.applied)
            if moved:
                changed.add(index)
    assert changed == {i for i, c in enumerate(strat.sampler.counts) if c > 0}
    assert len(changed) > 2


def test_offload_parks_state_on_cpu_and_restores_it_on_return():
    model, strat, updater = setup(inactive_state="offload", interval=1, sampled_layers=3)
    first_params = {}
    for step in range(30):
        train_step(step, model, strat, updater)
        for index in strat.applied:
            for param in strat.layer_params[index]:
                state = updater.optimizer.state[param]
                first_params.setdefault(param, 0)
                first_params[param] += 1
                # the step counter continues where it stopped: the parked moments came back
                assert int(state["step"]) == first_params[param]
    assert updater.offloaded_bytes() > 0
    live_layers = {i for i in range(NUM_LAYERS) if any(p in updater.optimizer.state for p in strat.layer_params[i])}
    assert live_layers == set(strat.applied)


def test_galore_offload_keeps_device_state_bounded_and_refreshes_returning_projectors():
    """With T far beyond the run, the only refreshes are the first one and one per return."""
    knobs = {**INSIDE["galore"], "update_proj_gap": 1000}
    model, strat, updater = setup(inactive_state="offload", sampled_layers=2, **knobs)
    train_step(0, model, strat, updater)
    after_one = updater.state_bytes()
    weights = [layer.self_attn.q_proj.weight for layer in decoder_layers(model)]
    refreshes_at_leave = {}
    returns = 0
    for step in range(1, 14):
        previous = set(strat.applied)
        train_step(step, model, strat, updater)
        assert updater.state_bytes() == after_one
        for index in previous - set(strat.applied):
            refreshes_at_leave[index] = updater.optimizer.state[weights[index]]["projector"].refreshes
        for index in set(strat.applied) - previous:
            projector = updater.optimizer.state[weights[index]]["projector"]
            expected = refreshes_at_leave.get(index, 0) + 1
            returns += index in refreshes_at_leave
            assert projector.refreshes == expected and not projector.stale
    assert updater.optimizer.state_bytes(offloaded=True) > 0
    assert returns > 0


def test_galore_layerwise_hooks_fire_for_layers_frozen_at_construction():
    """Every candidate is hooked even though all decoder layers were frozen when the updater was
    built: an active matrix's full gradient is absorbed into its low-rank accumulator in backward."""
    model, strat, updater = setup(interval=100, **{**INSIDE["galore"], "update_proj_gap": 1000})
    train_step(0, model, strat, updater)  # first step: projectors computed from full gradients
    strat.on_step_start(1, model, updater)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    absorbed = 0
    for index in strat.applied:
        for weight in (p for p in strat.layer_params[index] if p.ndim == 2):
            assert not updater.optimizer.state[weight]["projector"].due(1)
            assert weight.grad is None and "grad_acc" in updater.optimizer.state[weight]
            absorbed += 1
    assert absorbed == 2 * 7
    updater.step()


def test_drop_restarts_state_when_a_layer_returns():
    model, strat, updater = setup(interval=1, sampled_layers=3)
    counter = {}
    for step in range(20):
        previous = set(strat.applied)
        train_step(step, model, strat, updater)
        for index in strat.applied:
            counter[index] = counter[index] + 1 if index in previous else 1
            param = strat.layer_params[index][0]
            assert int(updater.optimizer.state[param]["step"]) == counter[index]
    assert any(c == 1 for c in counter.values()) and updater.offloaded_bytes() == 0


def test_strategy_json_records_probabilities_and_counts(tmp_path):
    model, strat, updater = setup(tmp_path, interval=2)
    for step in range(6):
        train_step(step, model, strat, updater)
    summary = json.loads((tmp_path / "strategy.json").read_text())
    assert summary["name"] == "lisa"
    assert [row["times_sampled"] for row in summary["layers"]] == strat.sampler.counts
    assert sum(row["times_sampled"] for row in summary["layers"]) == 3 * 2
    assert all(row["probability"] == pytest.approx(1 / NUM_LAYERS) for row in summary["layers"])
    assert summary["active_layers"] == strat.step_metrics()["active_layers"]


def _checkpoint(model, strat, updater) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "updater": updater.state_dict(), "strategy": strat.state_dict()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("inside", INSIDE)
@pytest.mark.parametrize("inactive_state", ["drop", "offload"])
def test_resume_mid_interval_restores_active_layers_and_trajectory(inactive_state, inside):
    """Uninterrupted 9 steps versus 5 steps + checkpoint + a fresh process's worth of objects + 4 steps.
    K = 3, so step 5 is in the middle of an interval."""
    knobs = dict(interval=3, sampled_layers=2, inactive_state=inactive_state, **INSIDE[inside])
    model, strat, updater = setup(seed=1, **knobs)
    reference_active = []
    for step in range(9):
        train_step(step, model, strat, updater)
        reference_active.append(strat.step_metrics()["active_layers"])
    reference = model.state_dict()

    model, strat, updater = setup(seed=1, **knobs)
    for step in range(5):
        train_step(step, model, strat, updater)
    saved = torch.load(io.BytesIO(_checkpoint(model, strat, updater)), weights_only=True)

    model, strat, updater = setup(seed=2, **knobs)  # different init: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    updater.load_state_dict(saved["updater"])
    strat.load_state_dict(saved["strategy"])
    for step in range(5, 9):
        train_step(step, model, strat, updater)
        assert strat.step_metrics()["active_layers"] == reference_active[step]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_adamw8bit_inside_sampled_layers():
    """bitsandbytes' 8-bit AdamW trains the sampled layers and the always-trained tensors: its
    blockwise uint8 state exists for exactly those (large enough) tensors, and only they move."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         max_position_embeddings=64))  # q/o_proj: 4096 values, 8-bit state
    strat = build_strategy(make_profile(optimizer="adamw8bit", sampled_layers=1))
    ctx = StrategyContext(device=torch.device("cpu"), dtype=torch.float32)
    strat.prepare_model(model, ctx)
    updater = strat.build_updater(model, ctx)
    assert isinstance(updater.optimizer, bnb.optim.AdamW8bit)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_step(0, model, strat, updater)
    (active,) = strat.step_metrics()["active_layers"]
    trained = {id(p) for p in strat.always_trained + strat.layer_params[active]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert {id(p) for p in updater.optimizer.state} == trained
    for param, state in updater.optimizer.state.items():
        if param.numel() >= 4096:  # bitsandbytes' min_8bit_size
            assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8, names[id(param)]
    assert any(p.numel() >= 4096 for p in updater.optimizer.state)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (id(p) in trained), name
