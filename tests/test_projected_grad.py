"""Layerwise GaLore takes a matrix's low-rank gradient in its layer's backward, (dY P)ᵀ X, between
refreshes: the same projection as Pᵀ G, no m x n gradient, the same trajectory, with activation
checkpointing too, and for INT8 weights and WeLore's factors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_tune.catalog import resolve_model
from lowmem_tune.modeling import enable_activation_checkpointing, load_model
from lowmem_tune.optim import GaLoreAdamW, GaLoreConfig, GaLoreUpdater
from lowmem_tune.optim.projector import GaLoreProjector
from lowmem_tune.strategies.galore import galore_matrices


@pytest.fixture(scope="module")
def tiny64():
    return load_model(resolve_model("tiny-llama"), "random", torch.float64, torch.device("cpu"), seed=0)


def batches(count: int) -> list[torch.Tensor]:
    # 48 tokens per micro-batch: no activation has the shape of a weight (hidden 64, kv 32, mlp 176)
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, 24), generator=gen) for _ in range(count)]


def build(model: torch.nn.Module, layerwise: bool = True, gap: int = 3, mats=None, stores=None,
          stagger: bool = True, projected: bool = True) -> GaLoreUpdater:
    """GaLore rank 8 over `mats` (the decoder linears' weights by default), AdamW over the rest.
    projected=False hands the updater no modules: every layer forms G and the hooks project it."""
    mats = galore_matrices(model) if mats is None else mats
    rest = [p for p in model.parameters() if all(p is not m for m in mats)]
    opt = GaLoreAdamW([{"params": mats, "rank": 8, "update_proj_gap": gap, "scale": 0.25}, {"params": rest}],
                      lr=1e-3, config=GaLoreConfig(weight_decay=0.01, stagger=stagger), stores=stores)
    return GaLoreUpdater(opt, 1.0, layerwise=layerwise, modules=list(model.modules()) if projected else ())


@pytest.mark.parametrize("proj_type,shape", [("std", (24, 40)), ("std", (40, 24)), ("full", (24, 40))])
def test_projecting_the_outer_product_equals_projecting_the_gradient(proj_type, shape):
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    proj = GaLoreProjector(shape, rank=6, proj_type=proj_type)
    if "left" in proj.sides:
        proj.left = torch.linalg.qr(torch.randn(m, 6, generator=gen, dtype=torch.float64)).Q
    if "right" in proj.sides:
        proj.right = torch.linalg.qr(torch.randn(n, 6, generator=gen, dtype=torch.float64)).Q.T
    grad_out = torch.randn(50, m, generator=gen, dtype=torch.float64)
    inputs = torch.randn(50, n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(proj.project_outer(grad_out, inputs), proj.project(grad_out.T @ inputs),
                               rtol=1e-12, atol=1e-12)


class WeightShapedProducts(TorchDispatchMode):
    """Counts matrix products whose result has the shape of a GaLore weight: its full gradient."""

    def __init__(self, shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes, self.count = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and tuple(out.shape) in self.shapes:
            self.count += 1
        return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_between_refreshes_no_full_weight_gradient_is_formed(tiny64, checkpointing):
    model = copy.deepcopy(tiny64)
    if checkpointing:
        enable_activation_checkpointing(model)
        model.train()
    updater = build(model, layerwise=True, gap=50)  # every matrix takes its basis at step 0, then not until 50
    mats = galore_matrices(model)
    counters = []
    for x in batches(3):
        counter = WeightShapedProducts({tuple(p.shape) for p in mats})
        with counter:
            model(input_ids=x, labels=x).loss.backward()
        counters.append(counter.count)
        assert all(p.grad is None for p in mats)
        measured = updater.step()
    assert counters[0] >= len(mats)  # step 0: every matrix's gradient, for its first basis
    assert counters[1:] == [0, 0]
    assert "full_grad_norm" not in measured  # the full gradient was never there to measure
    updater.close()
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_the_trajectory_equals_the_ordinary_optimizer_with_checkpointing_too(tiny64):
    """6 steps at T = 3 (refreshes of every phase in between), float64: ordinary mode (full
    gradients), layerwise mode (projected in backward), and layerwise with activation
    checkpointing, whose recompute must take the same path as the forward it replays."""
    finals = []
    for layerwise, checkpointing in ((False, False), (True, False), (True, True)):
        model = copy.deepcopy(tiny64)
        if checkpointing:
            enable_activation_checkpointing(model)
            model.train()
        updater = build(model, layerwise)
        for x in batches(6):
            model(input_ids=x, labels=x).loss.backward()
            updater.set_lr(1e-3)
            updater.step()
        updater.close()
        finals.append([p.detach().clone() for p in model.parameters()])
    for w0, plain, layered, checkpointed in zip(tiny64.parameters(), *finals):
        moved = float((plain - w0).abs().max())
        assert float((plain - layered).abs().max()) <= 1e-10 * moved
        assert float((layered - checkpointed).abs().max()) <= 1e-10 * moved


def _int8(model):
    from lowmem_tune.quantize import int8_layers, quantize_decoder

    quantize_decoder(model, 16, torch.device("cpu"))
    return galore_matrices(model), int8_layers(model)


def _welore(model):
    from lowmem_tune.compress import factorize, lowrank_modules

    factorize(model, {name: 12 for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                      and ".layers." in name})
    return [p for m in lowrank_modules(model).values() for p in m.factors()], None


@pytest.mark.parametrize("layers", [_int8, _welore], ids=["int8", "welore-factors"])
def test_layers_with_their_own_forward_take_the_same_low_rank_gradient_through_the_sink(tiny64, layers):
    """INT8 weights (their own autograd function) and WeLore's factors: with the sink, step 1's
    backward forms no weight-shaped product and leaves each matrix the low-rank gradient that the
    hook path (every layer forms G, the hook projects it) computes."""
    accumulated, counts = [], []
    for projected in (False, True):
        model = copy.deepcopy(tiny64)
        mats, stores = layers(model)
        assert len(mats) >= 14
        # no stagger: no matrix refreshes at step 1
        updater = build(model, gap=50, mats=mats, stores=stores, stagger=False, projected=projected)
        opt = updater.optimizer
        first, second = batches(2)
        model(input_ids=first, labels=first).loss.backward()
        updater.step()
        counter = WeightShapedProducts({tuple(p.shape) for p in mats})
        with counter:
            model(input_ids=second, labels=second).loss.backward()
        counts.append(counter.count)
        accumulated.append([opt.state[p]["grad_acc"].clone() for p in mats])
        updater.close()
    assert counts[0] >= len(mats) and counts[1] == 0
    for hooked, sunk in zip(*accumulated):
        torch.testing.assert_close(sunk, hooked, rtol=1e-10, atol=1e-12)


def _in_float64(proj: GaLoreProjector) -> GaLoreProjector:
    wide = copy.copy(proj)
    wide.left = None if proj.left is None else proj.left.double()
    wide.right = None if proj.right is None else proj.right.double()
    return wide


def test_in_bfloat16_the_projected_gradient_is_as_close_to_the_exact_one_as_the_hook_path():
    """bf16 weights (the GPU dtype): the projection in backward rounds dY P where the hook path
    rounds G. Against the float64 projection of the hook run's bf16 gradient (after step 0 both
    runs have the same weights and bases, bit for bit) both stay within bf16's rounding."""
    model = load_model(resolve_model("tiny-llama"), "random", torch.bfloat16, torch.device("cpu"), seed=0)
    first, second = batches(2)
    exact, errors = {}, {}
    for projected in (False, True):
        trial = copy.deepcopy(model)
        mats = galore_matrices(trial)
        updater = build(trial, gap=50, stagger=False, projected=projected)
        opt = updater.optimizer
        trial(input_ids=first, labels=first).loss.backward()
        updater.step()
        if not projected:
            for i, p in enumerate(mats):
                wide = _in_float64(opt.state[p]["projector"])
                p.register_hook(lambda g, i=i, wide=wide: exact.__setitem__(i, wide.project(g.double())))
        trial(input_ids=second, labels=second).loss.backward()
        errors[projected] = max(float((opt.state[p]["grad_acc"].double() - exact[i]).norm() / exact[i].norm())
                                for i, p in enumerate(mats))
        updater.close()
    assert len(exact) == 14
    # measured: 1.8e-3 (hook) and 3.1e-3 (projected); bf16's own relative rounding is 3.9e-3
    assert errors[True] <= 2 * errors[False] + 1e-3 and errors[True] < 1e-2
