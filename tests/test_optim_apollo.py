"""APOLLO and APOLLO-Mini in GaLoreAdamW: parity with apollo-torch, the random projection, 8-bit
moments, checkpoints, layerwise updates with accumulation, INT8 weights, layer sampling."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem_tune.optim import ApolloAdamW, GaLoreAdamW, GaLoreConfig
from lowmem_tune.optim.apollo import RandomProjector
from tests.test_optim_galore import feed, galore_groups, make_params, resume_midway


def apollo_groups(mats, dense=(), rank=8, gap=5, scale=1.0):
    return galore_groups(mats, dense, rank=rank, gap=gap, scale=scale)


@pytest.mark.parametrize("variant, rank, scale", [("apollo", 8, 2.0), ("apollo", 4, 1.0),
                                                 ("apollo-mini", 1, math.sqrt(128))])
def test_matches_apollo_torch_over_several_new_projections(monkeypatch, variant, rank, scale):
    """The same gradients and the same projections, 32-bit moments: the weights agree step by step.

    The projections are injected: apollo-torch draws each parameter's from a seed it chains per
    parameter (seed_{k+1} = next_seed(seed_k), starting at the parameter's index), ours from the
    global step and the matrix (so that processes, resumes and layer samples agree without
    state). The generator itself is the same (`test_projection_is_apollo_torchs_draw_for_its_seed`);
    only the seed schedule differs. So the reference's chain is held at its start (which then
    names the parameter) and its draw returns the projection ours drew at this step."""
    from apollo_torch import APOLLOAdamW
    from apollo_torch import random_projector

    start = make_params() + [torch.nn.Parameter(torch.randn(16))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in start]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in start]
    lr, adam = 1e-2, {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    opt = ApolloAdamW(apollo_groups(ours[:3], ours[3:], rank=rank, scale=scale), lr=lr,
                      config=GaLoreConfig(bits=32, variant=variant, **adam))
    ref_groups = apollo_groups(ref[:3], ref[3:], rank=rank, scale=scale ** 2)  # it multiplies by sqrt(scale)
    ref_groups[0].update(proj="random", scale_type="tensor" if variant == "apollo-mini" else "channel")
    ref_opt = APOLLOAdamW(ref_groups, lr=lr, **adam)

    draws = []

    def our_projection(self, weights, rank_, type, seed):  # seed = the parameter's 1-based index (chain held)
        proj = opt.state[ours[seed - 1]]["projector"]
        basis = proj.left if type == "left" else proj.right
        assert basis is not None and tuple(basis.shape) == ((weights.shape[0], rank_) if type == "left"
                                                            else (rank_, weights.shape[1]))
        draws.append((seed, opt.global_step - 1))
        return basis.clone()

    monkeypatch.setattr(random_projector, "next_seed", lambda seed, adv=None: seed)
    monkeypatch.setattr(random_projector.GradientProjector, "get_orthogonal_matrix", our_projection)
    gen = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(17):  # new projections at steps 0, 5, 10, 15
        feed(ref, gen)
        for a, b in zip(ref, ours):
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
        seen.append(opt.state[ours[0]]["projector"].seed)
    assert sorted(set(step for _, step in draws)) == [0, 5, 10, 15] and len(draws) == 12
    assert len(set(seen)) == 4 and opt.state[ours[0]]["projector"].refreshes == 4
    for a, b, w0 in zip(ref, ours, start):
        moved = (a.detach() - w0.detach()).norm()
        assert float(moved) > 0
        assert float((a.detach() - b.detach()).norm() / moved) <= 1e-5


def test_projection_is_apollo_torchs_draw_for_its_seed():
    """Given a seed, the projection is bit for bit apollo-torch's (`stable_randn(shape, seed) / sqrt(r)`,
    drawn on the weights' device, in the shape apollo-torch draws it)."""
    from apollo_torch.random_projector import stable_randn

    for shape, side in (((48, 32), "right"), ((32, 80), "left")):
        proj = RandomProjector(shape, 8)
        assert proj.sides == (side,)
        proj.redraw(1234, torch.zeros(shape), torch.float32)
        expected = stable_randn((shape[0], 8) if side == "left" else (8, shape[1]), seed=1234) / math.sqrt(8)
        assert torch.equal(proj.left if side == "left" else proj.right, expected)
        bf16 = RandomProjector(shape, 8)
        bf16.redraw(1234, torch.zeros(shape, dtype=torch.bfloat16), torch.bfloat16)
        assert torch.equal((bf16.left if side == "left" else bf16.right), expected.to(torch.bfloat16))


def test_no_svd_or_qr_is_ever_taken(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("APOLLO decomposed a matrix")

    for name in ("svd", "qr", "svdvals", "eigh"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    mats = make_params()
    opt = ApolloAdamW(apollo_groups(mats, gap=2), lr=1e-3, config=GaLoreConfig(variant="apollo"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        feed(mats, gen)
        opt.step()
    assert opt.state[mats[0]]["projector"].refreshes == 3


def test_8bit_moments_take_under_a_third_of_fp32_bytes_and_follow_the_32bit_step():
    w0 = make_params(shapes=[(256, 1024)])[0]
    grad = torch.randn(w0.shape, generator=torch.Generator().manual_seed(3))
    moved, moment_bytes = {}, {}
    for bits in (32, 8):
        w = torch.nn.Parameter(w0.detach().clone())
        opt = ApolloAdamW(apollo_groups([w], rank=64), lr=1e-3, config=GaLoreConfig(bits=bits, variant="apollo"))
        for _ in range(3):
            w.grad = grad.clone()
            opt.step()
        state = opt.state[w]
        moment_bytes[bits] = sum(t.numel() * t.element_size() for k, t in state.items()
                                 if k in ("exp_avg", "exp_avg_sq", "absmax1", "absmax2"))
        moved[bits] = w.detach() - w0.detach()
        if bits == 8:  # left projector (m < n): moments are r x n
            assert state["exp_avg"].dtype == torch.uint8 and tuple(state["exp_avg"].shape) == (64, 1024)
    assert moment_bytes[8] <= 0.3 * moment_bytes[32]
    cos = torch.nn.functional.cosine_similarity(moved[8].flatten(), moved[32].flatten(), dim=0)
    assert float(cos) > 0.99


@pytest.mark.parametrize("variant, bits", [("apollo", 32), ("apollo", 8), ("apollo-mini", 32)])
def test_state_dict_survives_weights_only_load_and_resumes_bitwise(variant, bits):
    def build(params):
        return ApolloAdamW(apollo_groups(params[:3], params[3:], gap=3, rank=1 if variant == "apollo-mini" else 8),
                           lr=1e-2, config=GaLoreConfig(weight_decay=0.01, bits=bits, variant=variant, stagger=True,
                                                        min_8bit_size=64))

    straight, resumed, opt2, loaded = resume_midway(build)
    assert {"projector.seed", "limiter_prev"} <= set(loaded["state"][0])
    assert isinstance(opt2.state[resumed[0]]["projector"], RandomProjector)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_moment_policies_other_than_keep_and_other_sides_are_refused():
    with pytest.raises(ValueError, match="runs as ApolloAdamW"):
        GaLoreAdamW(make_params(), config=GaLoreConfig(variant="apollo-mini"))
    with pytest.raises(ValueError, match="moments 'keep'"):
        GaLoreConfig(variant="apollo", moments="project")
    with pytest.raises(ValueError, match="proj_type std"):
        RandomProjector((8, 4), 2, proj_type="left")


# --------------------------------------------------------------------------- layerwise, on a model

@pytest.fixture(scope="module")
def tiny64():
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import load_model

    return load_model(resolve_model("tiny-llama"), "random", torch.float64, torch.device("cpu"), seed=0)


@pytest.mark.parametrize("variant", ["apollo", "apollo-mini"])
@pytest.mark.parametrize("k", [1, 3])
def test_layerwise_with_accumulation_takes_the_ordinary_optimizers_steps(tiny64, variant, k):
    """Layerwise, each matrix is updated in its hook at the step's last micro-batch from the
    gradient autograd accumulated, with the arithmetic of a step at step(): the same weights,
    bit for bit, clipping on (it clips the other tensors, in both modes by the same norm)."""
    import copy

    from lowmem_tune.optim import GaLoreUpdater
    from lowmem_tune.strategies.galore import galore_matrices

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(6 * k)]
    results = []
    for layerwise in (False, True):
        model = copy.deepcopy(tiny64)
        mats = galore_matrices(model)
        chosen = {id(p) for p in mats}
        rest = [p for p in model.parameters() if id(p) not in chosen]
        opt = ApolloAdamW([{"params": mats, "rank": 1 if variant == "apollo-mini" else 8, "update_proj_gap": 3,
                            "scale": 1.0}, {"params": rest}], lr=1e-3,
                          config=GaLoreConfig(weight_decay=0.01, variant=variant, micro_batches=k))
        updater = GaLoreUpdater(opt, max_grad_norm=0.5, layerwise=layerwise, modules=list(model.modules()))
        it = iter(batches)
        norms = []
        for _ in range(6):
            for micro in range(k):
                x = next(it)
                (model(input_ids=x, labels=x).loss / k).backward()
                updated = all(p.grad is None for p in mats)
                assert updated == (layerwise and micro == k - 1)  # freed in the hook at the last micro-batch
            updater.set_lr(1e-3)
            norms.append(updater.step())
        updater.close()
        assert opt.global_step == 6 and opt.state[mats[0]]["projector"].refreshes == 2
        results.append((model, norms))
    (plain, plain_norms), (layered, layered_norms) = results
    for a, b in zip(plain_norms, layered_norms):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert float(plain_norms[0]["grad_norm"]) > 0.5  # clipping was on
    for a, b, w0 in zip(plain.parameters(), layered.parameters(), tiny64.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, w0) for a, w0 in zip(plain.parameters(), tiny64.parameters()))


# --------------------------------------------------------------------------- profiles

def test_each_method_gets_its_own_rank_and_scale_unless_the_profile_sets_them():
    from lowmem_tune.profile import profile_from_dict

    def knobs(**strategy):
        s = profile_from_dict({"strategy": strategy}).strategy
        return s.rank, s.scale

    assert knobs(name="apollo") == (256, 1.0)
    assert knobs(name="apollo-mini") == (1, math.sqrt(128))
    assert knobs(name="apollo-mini", rank=4, scale=2.0) == (4, 2.0)
    assert knobs(name="owlore", optimizer="apollo-mini") == (1, math.sqrt(128))
    assert knobs(name="galore") == (128, 0.25)
    assert profile_from_dict({"strategy": {"name": "apollo", "fira_limiter": 1.05}}).strategy.fira_limiter == 1.05


@pytest.mark.parametrize("strategy, message", [
    ({"name": "apollo", "proj_type": "left"}, "strategy.proj_type does not apply to strategy apollo"),
    ({"name": "apollo-mini", "svd": "exact"}, "strategy.svd does not apply to strategy apollo-mini"),
    ({"name": "apollo", "moments": "reset"}, "strategy.moments does not apply to strategy apollo"),
    ({"name": "welore", "optimizer": "apollo"}, "strategy.optimizer apollo applies to lisa and owlore"),
    # the planner would count GaLore embeddings that the run would not have
    ({"name": "owlore", "optimizer": "apollo", "embedding_rank": 8}, "with optimizer: galore only"),
    ({"name": "lisa", "optimizer": "adamw", "weight_bits": 8},
     "needs strategy.optimizer: galore, apollo or apollo-mini"),
    ({"name": "apollo", "fira_limiter": 0.9}, "strategy.fira_limiter: must be at least 1"),
])
def test_bad_apollo_settings_are_one_line_errors(strategy, message):
    from lowmem_tune.errors import UserError
    from lowmem_tune.profile import profile_from_dict

    with pytest.raises(UserError, match=message) as err:
        profile_from_dict({"strategy": strategy})
    assert "\n" not in str(err.value)


def test_lisa_with_apollo_inside_trains_only_sampled_layers_through_apollo():
    from lowmem_tune.profile import profile_from_dict
    from lowmem_tune.strategies import StrategyContext, build_strategy
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import load_model

    profile = profile_from_dict({"model": {"name": "tiny-llama", "init": "random"},
                                 "strategy": {"name": "lisa", "optimizer": "apollo", "sampled_layers": 1, "interval": 2,
                                              "rank": 4, "update_proj_gap": 3}})
    model = load_model(resolve_model("tiny-llama"), "random", torch.float32, torch.device("cpu"), seed=0)
    strategy = build_strategy(profile)
    model = strategy.prepare_model(model, StrategyContext(device=torch.device("cpu"), dtype=torch.float32))
    updater = strategy.build_updater(model, StrategyContext(device=torch.device("cpu"), dtype=torch.float32))
    opt = updater.optimizer
    assert isinstance(opt, ApolloAdamW) and opt.config.variant == "apollo"
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for step in range(4):
        strategy.on_step_start(step, model, updater)
        model(input_ids=x, labels=x).loss.backward()
        updater.set_lr(1e-3)
        updater.step()
        held = [p for p in opt.state if opt.is_galore(p)]
        active = {id(p) for i in strategy.applied for p in strategy.layer_params[i]}
        assert held and all(id(p) in active for p in held)  # the state of layers that left is released
        assert all(isinstance(opt.state[p]["projector"], RandomProjector) for p in held)
    updater.close()


def test_switching_a_galore_profile_to_apollo_mini_takes_minis_rank_and_scale_and_says_so():
    from lowmem_tune.profile import load_profile

    notes: list[str] = []
    mini = load_profile("demo", ["strategy.name=apollo-mini"], notes).strategy  # the demo sets rank 32, scale 1
    assert (mini.rank, mini.scale) == (1, math.sqrt(128))
    assert any("apollo-mini's own strategy.rank 1, strategy.scale 11.3137 replace" in note for note in notes), notes
    kept = load_profile("demo", ["strategy.name=apollo", "strategy.rank=16"]).strategy
    assert (kept.rank, kept.scale) == (16, 1.0)  # asked for with --set: kept
