"""GaLoreAdamW: parity with galore-torch, 8-bit state size, checkpoints, refresh schedule, Fira."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from lowmem_tune.optim import GaLoreAdamW, GaLoreConfig, SVDFailure
from lowmem_tune.optim.projector import GaLoreProjector
from lowmem_tune.optim.subspace import refresh

SHAPES = [(48, 32), (32, 80), (40, 40)]


def make_params(seed: int = 0, shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def galore_groups(mats, dense=(), rank=8, gap=5, proj_type="std", scale=0.25):
    """Parameter groups: `mats` projected (GaLore's, or APOLLO's with the same keys), `dense` not."""
    groups = [{"params": list(mats), "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj_type}]
    if dense:
        groups.append({"params": list(dense)})
    return groups


def feed(params, gen, scale=1e-2):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_matches_galore_torch_over_several_refreshes(proj_type):
    from galore_torch import GaLoreAdamW as ReferenceAdamW

    start = make_params() + [torch.nn.Parameter(torch.randn(16))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in start]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in start]
    lr, adam = 1e-2, {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_opt = ReferenceAdamW(galore_groups(ref[:3], ref[3:], proj_type=proj_type), no_deprecation_warning=True,
                                 lr=lr, **adam)
    # svd exact: galore-torch's rule, the SVD of the step's gradient
    opt = GaLoreAdamW(galore_groups(ours[:3], ours[3:], proj_type=proj_type), lr=lr,
                      config=GaLoreConfig(bits=32, moments="keep", svd="exact", **adam))
    gen = torch.Generator().manual_seed(1)
    for _ in range(17):  # refreshes at steps 0, 5, 10, 15
        feed(ref, gen)
        for a, b in zip(ref, ours):
            b.grad = a.grad.clone()
        ref_opt.step()
        opt.step()
    assert opt.state[ours[0]]["projector"].refreshes == 4
    for a, b, w0 in zip(ref, ours, start):
        moved = (a.detach() - w0.detach()).norm()
        assert float((a.detach() - b.detach()).norm() / moved) <= 1e-5


def test_8bit_moments_take_under_a_third_of_fp32_bytes_and_follow_the_32bit_step():
    w0 = make_params(shapes=[(256, 1024)])[0]
    grad = torch.randn(w0.shape, generator=torch.Generator().manual_seed(3))
    moved = {}
    moment_bytes = {}
    for bits in (32, 8):
        w = torch.nn.Parameter(w0.detach().clone())
        opt = GaLoreAdamW(galore_groups([w], rank=64), lr=1e-3, config=GaLoreConfig(bits=bits))
        for _ in range(3):
            w.grad = grad.clone()
            opt.step()
        state = opt.state[w]
        moment_bytes[bits] = sum(t.numel() * t.element_size() for k, t in state.items()
                                 if k in ("exp_avg", "exp_avg_sq", "absmax1", "absmax2"))
        moved[bits] = w.detach() - w0.detach()
        if bits == 8:
            assert state["exp_avg"].dtype == torch.uint8 and tuple(state["exp_avg"].shape) == (64, 1024)  # left projector: r x n
    assert moment_bytes[8] <= 0.3 * moment_bytes[32]
    cos = torch.nn.functional.cosine_similarity(moved[8].flatten(), moved[32].flatten(), dim=0)
    assert float(cos) > 0.99


def test_8bit_kernel_in_pieces_gives_the_bits_of_one_call(monkeypatch):
    """A large tensor's 8-bit update runs a piece at a time; pieces start on block boundaries, so
    moments, absmax and weights are bitwise those of a single call (including a last short block)."""
    from lowmem_tune.optim import moments
    from lowmem_tune.optim.moments import Blockwise8bitMoments

    n = 13 * moments.BLOCKSIZE + 7
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for _ in range(3)]
    results = []
    for piece in (1 << 30, 2 * moments.BLOCKSIZE):
        monkeypatch.setattr(moments, "KERNEL_PIECE", piece)
        weight = torch.linspace(-1, 1, n)
        state = {"step": 0, **Blockwise8bitMoments.create((n,), weight.device)}
        for grad in grads:
            Blockwise8bitMoments.step_into(state, grad, weight, (0.9, 0.999), 1e-8, 1e-2, 0.1)
        results.append((weight, state))
    (w1, s1), (w2, s2) = results
    assert torch.equal(w1, w2) and not torch.equal(w1, torch.linspace(-1, 1, n))
    for key in ("exp_avg", "exp_avg_sq", "absmax1", "absmax2"):
        assert torch.equal(s1[key], s2[key]), key


def test_small_dense_tensors_keep_fp32_moments_in_8bit_mode():
    big, small = torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(64))
    opt = GaLoreAdamW([big, small], lr=1e-3, config=GaLoreConfig(bits=8))
    big.grad, small.grad = torch.randn(8192), torch.randn(64)
    opt.step()
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    assert opt.state[small]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("bits,moments,variant", [(32, "keep", "galore"), (8, "project", "galore"),
                                                  (32, "reset", "fira")])
def test_state_dict_survives_weights_only_load_and_resumes_bitwise(bits, moments, variant):
    def build(params):
        return GaLoreAdamW(galore_groups(params[:3], params[3:], gap=3), lr=1e-2,
                           config=GaLoreConfig(weight_decay=0.01, bits=bits, moments=moments, variant=variant,
                                               stagger=True, min_8bit_size=64))

    straight, resumed, _, _ = resume_midway(build)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def resume_midway(build):
    """Nine optimizer steps straight; and four, a weights-only save and load of the optimizer state,
    a new optimizer (`build(params)`) loaded with it, then the other five. Returns (the straight
    weights, the resumed weights, the new optimizer, the state it loaded)."""
    start = make_params() + [torch.nn.Parameter(torch.randn(300))]
    grads = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * s + i)) * 1e-2
              for i, p in enumerate(start)] for s in range(9)]

    def run(params, opt, steps):
        for s in steps:
            for p, g in zip(params, grads[s]):
                p.grad = g.clone()
            opt.step()

    straight = [torch.nn.Parameter(p.detach().clone()) for p in start]
    run(straight, build(straight), range(9))

    first = [torch.nn.Parameter(p.detach().clone()) for p in start]
    opt = build(first)
    run(first, opt, range(4))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = build(resumed)
    opt2.load_state_dict(loaded)
    run(resumed, opt2, range(4, 9))
    return straight, resumed, opt2, loaded


def test_staggered_phases_spread_refreshes_over_the_gap():
    mats = make_params(shapes=[(24, 16)] * 14)
    opt = GaLoreAdamW(galore_groups(mats, gap=7, rank=4), lr=1e-3, config=GaLoreConfig(stagger=True))
    gen = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(15):
        feed(mats, gen)
        opt.step()
        per_step.append(opt.refreshed_last_step)
    assert per_step[0] == 14  # every matrix needs a first basis (cheap randomized SVD)
    assert per_step[1:] == [2] * 14  # then 14 matrices / T=7 per step
    flat = GaLoreAdamW(galore_groups(make_params(shapes=[(24, 16)] * 14), gap=7, rank=4), lr=1e-3)
    counts = []
    for _ in range(8):
        feed(flat.param_groups[0]["params"], gen)
        flat.step()
        counts.append(flat.refreshed_last_step)
    assert counts == [14, 0, 0, 0, 0, 0, 0, 14]


def test_nan_gradient_fails_the_svd_with_the_parameter_name():
    w = make_params(shapes=[(16, 8)])[0]
    opt = GaLoreAdamW(galore_groups([w], rank=4), lr=1e-3, param_names={w: "model.layers.3.mlp.down_proj.weight"})
    w.grad = torch.full(w.shape, float("nan"))
    with pytest.raises(SVDFailure, match=r"model\.layers\.3\.mlp\.down_proj\.weight"):
        opt.step()


@pytest.mark.parametrize("moments", ["keep", "project", "reset"])
def test_moment_policy_at_a_subspace_change(moments):
    w = make_params(shapes=[(32, 12)])[0]  # m >= n: right projector, moments are 32 x 4
    betas = (0.9, 0.999)
    opt = GaLoreAdamW(galore_groups([w], rank=4, gap=2), lr=1e-3, config=GaLoreConfig(betas=betas, moments=moments))
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        feed([w], gen, scale=1.0)
        opt.step()
    state = opt.state[w]
    m_old, v_old = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    q_old = state["projector"].right.clone()
    feed([w], gen, scale=1.0)
    grad = w.grad.clone()
    opt.step()  # step 2 refreshes the basis
    q_new = state["projector"].right
    assert not torch.allclose(q_new.abs(), q_old.abs())
    low = grad @ q_new.T
    if moments == "keep":
        carried_m, carried_v, step = m_old, v_old, 3
    elif moments == "project":
        rot = q_old @ q_new.T
        carried_m, carried_v, step = m_old @ rot, v_old @ rot.square(), 3
    else:
        carried_m, carried_v, step = torch.zeros_like(m_old), torch.zeros_like(v_old), 1
    torch.testing.assert_close(state["exp_avg"], betas[0] * carried_m + (1 - betas[0]) * low)
    torch.testing.assert_close(state["exp_avg_sq"], betas[1] * carried_v + (1 - betas[1]) * low.square())
    assert state["step"] == step


def test_fira_adds_the_limited_residual_outside_the_subspace():
    w0 = make_params(shapes=[(20, 48)])[0]  # m < n: left projector
    grads = [torch.randn(w0.shape, generator=torch.Generator().manual_seed(s)) * (10.0 ** s) for s in range(4)]
    deltas = {}
    for variant in ("galore", "fira"):
        w = torch.nn.Parameter(w0.detach().clone())
        # the same basis in both (Fira's is always the exact SVD of the step's gradient)
        opt = GaLoreAdamW(galore_groups([w], rank=6, gap=100, scale=1.0), lr=1.0,
                          config=GaLoreConfig(variant=variant, svd="exact"))
        steps = []
        for g in grads:
            before = w.detach().clone()
            w.grad = g.clone()
            opt.step()
            steps.append(w.detach() - before)
        deltas[variant] = steps
        basis = opt.state[w]["projector"].left
    residual_norms = []
    for fira, galore in zip(deltas["fira"], deltas["galore"]):
        residual = galore - fira  # lr = 1: the Fira residual term
        assert float((basis.T @ residual).norm()) <= 1e-4 * float(residual.norm())  # outside the subspace
        residual_norms.append(float(residual.norm()))
    assert residual_norms[0] > 0
    for prev, cur in zip(residual_norms, residual_norms[1:]):  # gradients grow 10x a step; the limiter holds
        assert cur <= 1.01 * prev * (1 + 1e-5)


def test_projector_state_dict_is_plain_tensors_and_numbers():
    proj = GaLoreProjector((12, 30), rank=4, update_proj_gap=10, proj_type="full", phase=13)
    refresh(proj, torch.randn(12, 30), "exact", torch.float32, seed=0)
    state = proj.state_dict()
    assert proj.phase == 3
    assert all(isinstance(v, (torch.Tensor, int, float, bool)) for v in state.values())
    assert state["left"].shape == (12, 4) and state["right"].shape == (4, 30)


def test_optimizer_runs_under_fake_tensor_mode_with_real_state_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def layout(bits, moments):
        w, b = torch.nn.Parameter(torch.randn(64, 200)), torch.nn.Parameter(torch.randn(5000))
        opt = GaLoreAdamW(galore_groups([w], [b], rank=16, gap=2), lr=1e-3,
                          config=GaLoreConfig(bits=bits, moments=moments, stagger=True))
        for _ in range(3):
            w.grad, b.grad = torch.randn(64, 200), torch.randn(5000)
            opt.step()
        return {(k, tuple(v.shape), v.dtype) for s in opt.state.values() for k, v in s.items()
                if isinstance(v, torch.Tensor)}, opt.state_bytes()

    for bits, moments in ((32, "keep"), (8, "project")):
        real = layout(bits, moments)
        with FakeTensorMode():
            fake = layout(bits, moments)
        assert fake == real


def test_gradient_norms_of_large_bf16_tensors_are_exact():
    """A float32 reduction over a whole large bf16 gradient drifts (1.9% at 16M equal values);
    the norm clipping uses is summed in float64 pieces."""
    from lowmem_tune.optim.norms import squared_norm

    grad = torch.full((1 << 24,), 1e-3, dtype=torch.bfloat16)
    exact = float(torch.linalg.vector_norm(grad, dtype=torch.float64).square())
    assert squared_norm(grad).dtype == torch.float32
    assert abs(float(squared_norm(grad)) / exact - 1) < 1e-6
    uneven = torch.randn((1 << 21) + 5, dtype=torch.float64)  # two full pieces and a short one
    assert float(squared_norm(uneven)) == pytest.approx(float(uneven.square().sum()), rel=1e-12)
    small = torch.randn(7, 5, dtype=torch.float64)
    assert squared_norm(small).dtype == torch.float64
    assert float(squared_norm(small)) == pytest.approx(float(small.square().sum()), rel=1e-14)
