"""The layerwise engine on a tiny Llama: accumulation, clipping, live gradient memory, release,
where bases come from (the whole batch's sketch, or the first micro-batch), rank-deficient
gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from safetensors.torch import load_file

from lowmem_tune.catalog import resolve_model
from lowmem_tune.modeling import load_model
from lowmem_tune.optim import GaLoreAdamW, GaLoreConfig, GaLoreUpdater
from lowmem_tune.optim.projector import GaLoreProjector
from lowmem_tune.optim.subspace import RangeSketch, refresh, top_singular_vectors
from lowmem_tune.profile import load_profile, profile_from_dict
from lowmem_tune.strategies import StrategyContext, build_strategy
from lowmem_tune.strategies.galore import galore_matrices
from lowmem_tune.train import run_training


class _Quiet:
    def emit(self, event) -> None:
        pass


@pytest.fixture(scope="module")
def tiny():
    return load_model(resolve_model("tiny-llama"), "random", torch.float32, torch.device("cpu"), seed=0)


@pytest.fixture(scope="module")
def tiny64():
    """float64: projecting micro-batches one by one changes only the summation order, but in float32
    Adam's normalization turns that rounding into sign flips of near-zero low-rank coordinates (it
    did with 2 CPU threads and not with 1); in float64 the comparison tests the engine, not BLAS."""
    return load_model(resolve_model("tiny-llama"), "random", torch.float64, torch.device("cpu"), seed=0)


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(24)]


def build(model, layerwise, variant="galore", max_grad_norm=1.0, gap=3, bits=32, eps=1e-8, svd="sketch", k=1):
    mats = galore_matrices(model)
    chosen = {id(p) for p in mats}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    opt = GaLoreAdamW([{"params": mats, "rank": 8, "update_proj_gap": gap, "scale": 0.25}, {"params": rest}],
                      lr=1e-3, config=GaLoreConfig(eps=eps, weight_decay=0.01, bits=bits, variant=variant,
                                                   stagger=True, min_8bit_size=256, svd=svd, micro_batches=k))
    return GaLoreUpdater(opt, max_grad_norm, layerwise=layerwise, modules=list(model.modules()))


def train(model, updater, batches, k, steps):
    it = iter(batches)
    norms = []
    for _ in range(steps):
        for _ in range(k):
            x = next(it)
            (model(input_ids=x, labels=x).loss / k).backward()
        updater.set_lr(1e-3)
        norms.append(float(updater.step()["grad_norm"]))
        assert all(p.grad is None for p in model.parameters())
    return norms


@pytest.mark.parametrize("threads", [1, 2])
def test_layerwise_follows_the_ordinary_optimizer_on_the_demo(tmp_path, threads):
    """The demo in float32 (8-bit GaLore, rank 32), micro batch 1, accumulation 4, 8 steps, the
    default basis rule: layerwise and ordinary stepping end within 1e-4 of each other, relative to
    the weights' norm, at 1 and 2 BLAS threads. (The first-micro-batch rule ended 1.2e-3 and
    1.7e-3 apart here: bases of rank-deficient micro-batch gradients amplify summation order.)"""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        final = {}
        for layerwise in (False, True):
            profile = load_profile("demo", ["model.dtype=float32", f"strategy.layerwise={str(layerwise).lower()}",
                                            "train.micro_batch_size=1",
                                            "train.gradient_accumulation=4", "train.max_steps=8", "eval.tasks=[]",
                                            "data.heldout=0", f"output.dir={tmp_path / str(layerwise)}"])
            assert profile.strategy.svd == "sketch"
            assert run_training(profile, False, _Quiet()).status == "completed"
            final[layerwise] = load_file(str(tmp_path / str(layerwise) / "final" / "model.safetensors"))
    finally:
        torch.set_num_threads(previous)
    apart = sum(float((final[False][k] - final[True][k]).norm()) ** 2 for k in final[True]) ** 0.5
    norm = sum(float(final[False][k].norm()) ** 2 for k in final[True]) ** 0.5
    assert 0 < apart <= 1e-4 * norm


@pytest.mark.parametrize("k,variant,svd", [(1, "galore", "sketch"), (4, "galore", "sketch"), (4, "galore", "exact"),
                                           (4, "fira", "sketch")])
def test_layerwise_with_accumulation_follows_the_ordinary_optimizer(tiny64, batches, k, variant, svd):
    steps = 6  # refreshes of every phase at T = 3
    tiny = tiny64
    results = []
    for layerwise in (False, True):
        model = copy.deepcopy(tiny)
        updater = build(model, layerwise, variant, svd=svd, k=k)
        norms = train(model, updater, batches, k, steps)
        assert updater.optimizer.global_step == steps  # one optimizer step per logical batch
        results.append((model, norms))
    (plain, plain_norms), (layered, layered_norms) = results
    torch.testing.assert_close(layered_norms, plain_norms, rtol=1e-5, atol=0)
    for a, b, w0 in zip(plain.parameters(), layered.parameters(), tiny.parameters()):
        moved = (a - w0).detach().abs().max()
        if k == 1 and variant == "fira":  # Fira keeps full gradients: the very same arithmetic
            assert torch.equal(a, b)
        elif k == 1:  # projected in backward as (dY P)ᵀ X instead of Pᵀ (dYᵀ X): float64 rounding only
            assert float((a - b).detach().abs().max()) <= 1e-10 * float(moved)
        else:  # micro-batches are projected one by one: summation order differs, nothing else
            assert float((a - b).detach().abs().max()) <= 1e-4 * float(moved)


def test_clipping_in_layerwise_mode_scales_the_step(tiny, batches):
    """A clipped layerwise step equals an unclipped one on gradients pre-scaled by max_norm / norm.
    (eps is large here so that Adam's first step is not scale-invariant and clipping shows; float64
    weights so that the tiny moves are not lost in the weights' rounding.)"""
    x = batches[0]
    start = copy.deepcopy(tiny).double()

    def one_step(max_grad_norm, loss_scale=1.0):
        model = copy.deepcopy(start)
        updater = build(model, layerwise=True, max_grad_norm=max_grad_norm, eps=1e-3)
        (model(input_ids=x, labels=x).loss * loss_scale).backward()
        measured = updater.step()
        return model, float(measured["grad_norm"]), float(measured["full_grad_norm"])

    unclipped, total, full = one_step(None)
    assert total > 0 and full >= total  # the consumed gradient is a projection of the full one
    clipped, reported, _ = one_step(0.1 * total)
    assert reported == pytest.approx(total, rel=1e-6)  # the norm before clipping
    scaled, _, _ = one_step(None, loss_scale=0.1 * total / (total + 1e-6))
    for w0, a, b, c in zip(start.parameters(), clipped.parameters(), scaled.parameters(), unclipped.parameters()):
        moved = float((a - w0).detach().abs().max())
        assert float((a - b).detach().abs().max()) <= 1e-5 * moved
        if a.ndim == 2:
            assert float((a - c).detach().abs().max()) > 0.1 * moved


class GradBytesTracker(TorchDispatchMode):
    """After every op, the bytes held in .grad of the GaLore matrices and in low-rank accumulators."""

    def __init__(self, mats, optimizer):
        super().__init__()
        self.mats, self.optimizer = mats, optimizer
        self.peak_grads = self.peak_acc = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.mats if p.grad is not None)
        acc = sum(s["grad_acc"].numel() * 4 for s in self.optimizer.state.values() if "grad_acc" in s)
        self.peak_grads, self.peak_acc = max(self.peak_grads, grads), max(self.peak_acc, acc)
        return out


@pytest.mark.parametrize("k", [1, 3])
def test_live_gradient_bytes_stay_bounded_during_backward(tiny, batches, k):
    model = copy.deepcopy(tiny)
    mats = galore_matrices(model)
    nbytes = [p.numel() * p.element_size() for p in mats]
    peaks = {}
    for layerwise in (False, True):
        updater = build(model, layerwise, gap=4)
        opt = updater.optimizer
        it = iter(batches)
        for step in range(5):
            refreshing = sum(b for p, b in zip(mats, nbytes) if opt.keeps_full_grad(p))
            acc_bound = sum(4 * min(8, *p.shape) * max(p.shape) for p in mats)
            tracker = GradBytesTracker(mats, opt)
            with tracker:
                for _ in range(k):
                    x = next(it)
                    (model(input_ids=x, labels=x).loss / k).backward()
            updater.step()
            if layerwise:
                assert tracker.peak_grads <= max(nbytes) + refreshing
                assert tracker.peak_acc <= acc_bound
                assert refreshing <= 0.5 * sum(nbytes)  # only the staggered few keep their full gradient
                if step == 0:  # no basis yet: each matrix takes one from its first micro-batch gradient
                    assert refreshing == 0 and tracker.peak_grads <= max(nbytes)
                    assert opt.refreshed_last_step == len(mats)
            peaks.setdefault(layerwise, []).append(tracker.peak_grads)
        updater.close()
    assert peaks[False] == [sum(nbytes)] * 5  # the tracker sees every gradient without the engine
    assert max(peaks[True]) < 0.6 * sum(nbytes)


def test_release_drops_or_offloads_state_and_a_returning_matrix_refreshes(tiny, batches):
    model = copy.deepcopy(tiny)
    updater = build(model, layerwise=True, gap=50, bits=8)
    opt = updater.optimizer
    assert opt.state_bytes() == 0  # lazily created
    x = batches[0]
    model(input_ids=x, labels=x).loss.backward()
    updater.step()
    full_bytes = opt.state_bytes()
    layer0 = [p for name, p in model.named_parameters() if ".layers.0." in name and p.ndim == 2]
    layer1 = [p for name, p in model.named_parameters() if ".layers.1." in name and p.ndim == 2]

    updater.release(layer0)
    dropped = opt.state_bytes()
    assert 0 < dropped < full_bytes and all(p not in opt.state for p in layer0)

    updater.release(layer1, offload=True)
    assert opt.state_bytes() < dropped and opt.state_bytes(offloaded=True) > 0
    assert all(t.device.type == "cpu" for p in layer1 for t in opt.state[p].values() if isinstance(t, torch.Tensor))

    model(input_ids=x, labels=x).loss.backward()
    # the returning matrices took their bases in the hooks and freed their gradients at once
    assert all(p.grad is None for p in layer0 + layer1)
    updater.step()
    # every matrix of both released layers took a new basis at step 1, though T is 50
    assert opt.refreshed_last_step == len(layer0) + len(layer1)
    assert opt.state_bytes() == full_bytes and opt.state_bytes(offloaded=True) == 0


def test_galore_strategy_builds_a_layerwise_8bit_updater_from_the_profile(tiny, batches):
    profile = profile_from_dict({"strategy": {"name": "galore", "rank": 8, "update_proj_gap": 2, "bits": 8},
                                 "train": {"weight_decay": 0.1, "betas": [0.8, 0.95], "eps": 1e-6}})
    strategy = build_strategy(profile)
    model = copy.deepcopy(tiny)
    updater = strategy.build_updater(model, StrategyContext(device=torch.device("cpu"), dtype=torch.float32))
    group = updater.optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.1
    assert updater.layerwise and updater.optimizer.config.bits == 8
    assert strategy.describe()["galore_matrices"] == 14
    train(model, updater, batches, k=2, steps=2)
    metrics = updater.metrics()
    assert metrics["projectors_refreshed"] == 7 and metrics["next_refresh_in"] == 0
    assert metrics["refresh_s"] > 0
    updater.close()


def _two_micro_batches(w, svd, layerwise, rank=4):
    inputs = [torch.randn(40, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    opt = GaLoreAdamW([{"params": [w], "rank": rank, "update_proj_gap": 10}], lr=1e-3,
                      config=GaLoreConfig(svd=svd, micro_batches=2))
    updater = GaLoreUpdater(opt, None, layerwise=layerwise)
    for x in inputs:
        (w @ x).square().sum().backward()
    grads = [2 * (w @ x).detach() @ x.T for x in inputs]  # d/dW of each micro-batch's loss
    return opt, updater, grads


def _top_subspace(matrix, rank):
    u = torch.linalg.svd(matrix, full_matrices=False).U[:, :rank]
    return u @ u.T


@pytest.mark.parametrize("layerwise", [False, True])
def test_the_sketch_takes_the_basis_from_the_whole_batch_in_both_modes(layerwise):
    """Each micro-batch gradient has rank 6 and the sketch 4 + 8 columns, so the sketch holds the
    whole batch's gradient exactly and its basis is that gradient's top-4 subspace."""
    w = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(0)))
    opt, updater, grads = _two_micro_batches(w, "sketch", layerwise)
    assert (w.grad is None) == layerwise  # ordinary mode accumulates the full gradient as usual
    updater.step()
    left = opt.state[w]["projector"].left  # m < n: left projector
    torch.testing.assert_close(left @ left.T, _top_subspace(grads[0] + grads[1], 4), atol=1e-4, rtol=0)
    assert not torch.allclose(left @ left.T, _top_subspace(grads[0], 4), atol=1e-2)
    assert opt.refreshed_last_step == 1 and opt.state[w]["projector"].refreshes == 1
    updater.close()


@pytest.mark.parametrize("layerwise", [False, True])
def test_first_micro_batch_rule_takes_the_basis_in_the_hook_in_both_modes(layerwise):
    w = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(0)))
    opt, updater, grads = _two_micro_batches(w, "first_micro_batch", layerwise)
    left = opt.state[w]["projector"].left
    torch.testing.assert_close(left @ left.T, _top_subspace(grads[0], 4))  # before the step: from the first
    updater.step()
    assert opt.refreshed_last_step == 1 and opt.state[w]["projector"].refreshes == 1
    updater.close()


@pytest.mark.parametrize("svd", ["sketch", "exact"])
def test_a_rank_deficient_gradient_gets_only_supported_directions_then_fills(svd):
    """A gradient of rank 3 at rank 8: the basis keeps 3 directions (the others zero, so no update
    moves along them), says so once, and takes the missing ones from the next steps' gradients;
    the directions are the same at 1 and 2 BLAS threads."""
    torch.manual_seed(0)
    shape, told = (30, 50), []
    factors = [(torch.randn(30, 3), torch.randn(3, 50)) for _ in range(4)]

    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            w = torch.nn.Parameter(torch.zeros(shape))
            opt = GaLoreAdamW([{"params": [w], "rank": 8, "update_proj_gap": 100}], lr=1e-3,
                              config=GaLoreConfig(svd=svd), inform=told.append)
            proj_history = []
            for a, b in factors:
                w.grad = a @ b
                opt.step()
                proj = opt.state[w]["projector"]
                proj_history.append((proj.supported, proj.left.clone()))
            return proj_history
        finally:
            torch.set_num_threads(previous)

    first = run(1)
    assert [supported for supported, _ in first] == [3, 6, 8, 8]
    supported, left = first[0]
    assert torch.count_nonzero(left.norm(dim=0)) == 3  # zero columns where the gradient has nothing
    a, b = factors[0]
    torch.testing.assert_close(left @ left.T, _top_subspace(a @ b, 3), atol=1e-4, rtol=0)
    assert len(told) == 1 and "supports 3 of 8" in told[0]
    second = run(2)
    for (s1, l1), (s2, l2) in zip(first, second):
        assert s1 == s2
        torch.testing.assert_close(l1 @ l1.T, l2 @ l2.T, atol=1e-5, rtol=0)


def test_decompositions_do_not_depend_on_the_thread_count():
    """A basis, and the sketch factors it comes from, are the same bits at 1 and 2 threads: MKL's
    QR and SVD differ in the last bits between the two (1e-7 and 1e-5 on a 352 x 128 matrix), and
    a basis carries that into every later step. The thread count is restored afterwards."""
    generator = torch.Generator().manual_seed(0)
    gradient = torch.randn(352, 128, generator=generator)
    sketch = RangeSketch(352, 128, 32, seed=5, like=gradient)
    for _ in range(2):
        sketch.add(torch.randn(352, 128, generator=generator))

    def decompose(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            exact = top_singular_vectors(gradient, 32, "exact")
            randomized = top_singular_vectors(gradient, 32, "randomized", seed=3)
            factors = sketch.factors()
            assert torch.get_num_threads() == threads
            return (*exact, *randomized, *factors)
        finally:
            torch.set_num_threads(previous)

    for one, two in zip(decompose(1), decompose(2), strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("rule", ["sketch", "randomized"])
def test_a_basis_does_not_flip_on_a_last_bit_change_of_the_gradient(rule):
    """Gradients 1e-15 apart give bases 1e-10 apart, each vector's largest entry positive. LAPACK's
    own singular vectors do flip here (about 1 in 100 such pairs reverses one of 8 vectors), and
    under the `keep` moment policy a reversed vector reverses Adam's first moment along it."""
    generator = torch.Generator().manual_seed(0)
    f64 = {"dtype": torch.float64, "generator": generator}
    for _ in range(100):
        a = torch.randn(16, 176, **f64)
        bases = []
        for grad in (a, a + 1e-15 * torch.randn(16, 176, **f64)):
            proj = GaLoreProjector((16, 176), 8)
            gradient = (torch.eye(16, dtype=torch.float64), grad) if rule == "sketch" else grad
            refresh(proj, gradient, rule, torch.float64, seed=0)
            bases.append(proj.left)
        assert (bases[0] - bases[1]).abs().max() <= 1e-10
        largest = bases[0].gather(0, bases[0].abs().argmax(dim=0, keepdim=True))
        assert bool((largest > 0).all())


def test_first_basis_sketches_fit_in_what_the_waiting_matrices_will_hold(tiny, batches):
    """With two micro-batches a step, the first-basis sketches of step 0 live across them: they
    are admitted only while they fit in the bytes the matrices still without a basis will hold
    once trained (projector, accumulator, moments, as measured after training), a matrix left
    waiting holds no moments and drops that step's gradient, and every matrix has a basis within
    a few steps (a sketch here is about 2.5 times what its matrix will hold: the last one takes its
    basis at the 7th step)."""
    model = copy.deepcopy(tiny)
    updater = build(model, layerwise=True, bits=8, k=2)
    opt = updater.optimizer
    mats = [p for p in opt.params() if opt.is_galore(p)]
    it = iter(batches)
    with_basis = []
    for step in range(10):
        for micro in range(2):
            x = next(it)
            (model(input_ids=x, labels=x).loss / 2).backward()
            if step == 0 and micro == 0:
                sketches = sum(opt.state[p]["sketch"].nbytes() for p in mats if "sketch" in opt.state[p])
                waiting = [p for p in mats if "deferred" in opt.state[p]]
                assert waiting and all("exp_avg" not in opt.state[p] for p in waiting)
        updater.set_lr(1e-3)
        updater.step()
        with_basis.append(sum(not opt.state[p]["projector"].needs_basis() for p in mats))
    assert with_basis[-1] == len(mats) and with_basis[0] < len(mats)
    assert with_basis == sorted(with_basis)

    def trained_bytes(p):
        state, proj = opt.state[p], opt.state[p]["projector"]
        low = proj.low_rank_shape()
        moments = sum(t.nbytes for k, t in state.items() if k in ("exp_avg", "exp_avg_sq", "absmax1", "absmax2"))
        basis = sum(t.nbytes for t in (proj.left, proj.right) if t is not None)
        return moments + basis + 4 * low[0] * low[1]  # the float32 accumulator of a step

    one_sketch = max(RangeSketch(*oriented_shape(opt, p), 8, 0, p).nbytes() for p in mats)
    assert sketches <= max(sum(trained_bytes(p) for p in mats), one_sketch)
    updater.close()


def oriented_shape(opt, p):
    """(d, D) of p's gradient as its sketch sees it: the projected side first."""
    proj = opt.state[p]["projector"]
    m, n = proj.shape
    return (m, n) if proj.sides == ("left",) else (n, m)


def test_hooks_on_frozen_candidates_work_once_they_are_unfrozen():
    w = torch.nn.Parameter(torch.randn(32, 16), requires_grad=False)
    updater = GaLoreUpdater(GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 10}], lr=1e-3), None)
    w.requires_grad_(True)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    for step in range(2):
        (w @ x).square().sum().backward()
        assert w.grad is None  # step 0 too: the gradient went into the sketch in the hook
        updater.step()
        assert updater.optimizer.state[w]["projector"].refreshes == 1
    assert updater.optimizer.global_step == 2


@pytest.mark.parametrize("name,bits", [("galore", 8), ("fira", 32)])
def test_strategy_runs_under_fake_tensor_mode_with_the_real_state_bytes(name, bits):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    profile = profile_from_dict({"strategy": {"name": name, "rank": 8, "update_proj_gap": 2, "bits": bits},
                                 "train": {"gradient_accumulation": 2}})
    config = resolve_model("tiny-llama").config

    def state_bytes(fake):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        updater = build_strategy(profile).build_updater(
            model, StrategyContext(device=torch.device("cpu"), dtype=torch.float32, fake=fake))
        for _ in range(3):
            for _ in range(2):
                x = torch.randint(0, 256, (2, 16))
                (model(input_ids=x, labels=x).loss / 2).backward()
            updater.set_lr(1e-3)
            updater.step()
        return updater.state_bytes()

    real = state_bytes(False)
    with FakeTensorMode():
        fake = state_bytes(True)
    assert fake == real > 0
