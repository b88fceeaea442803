"""APOLLO and APOLLO-Mini in GaLoreAdamW: parity with apollo-torch, the random projection, 8-bit
moments, checkpoints, layerwise updates with accumulation, INT8 weights, layer sampling."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lowmem_tune.optim import GaLoreAdamW, GaLoreConfig
from lowmem_tune.optim.apollo import RandomProjector

SHAPES = [(48, 32), (32, 80), (40, 40)]  # right, left and right (square) projections under 'std'


def make_params(seed: int = 0, shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def apollo_groups(mats, dense=(), rank=8, gap=5, scale=1.0):
    groups = [{"params": list(mats), "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"}]
    if dense:
        groups.append({"params": list(dense)})
    return groups


def feed(params, gen, scale=1e-2):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale


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
    opt = GaLoreAdamW(apollo_groups(ours[:3], ours[3:], rank=rank, scale=scale), lr=lr,
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
