"""Optimizer and projector steps on fake CUDA tensors: no GPU needed, and a CPU tensor mixed into
a CUDA step fails here as it would on a GPU (FakeTensorMode checks devices; slicing and autograd
are what it cannot run, so gradients are set by hand and hooks are called directly)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from lowmem_tune.optim import GaLoreAdamW, GaLoreConfig, StandardUpdater, StochasticRounding
from lowmem_tune.optim.layerwise import GaLoreUpdater


def cuda(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="cuda").normal_()


def test_fake_cuda_catches_a_cpu_tensor_in_a_step():
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(FakeTensorDeviceMismatchError):
            cuda(8, 4) @ torch.ones(4, 2)


@pytest.mark.parametrize("bits, svd, moments, layerwise", [
    (32, "sketch", "keep", True), (32, "sketch", "project", False), (8, "exact", "project", True),
    (32, "randomized", "reset", False), (8, "first_micro_batch", "keep", True),
])
def test_galore_steps_keep_every_tensor_on_the_device(bits, svd, moments, layerwise):
    with FakeTensorMode(allow_non_fake_inputs=True):
        left, right, dense = (torch.nn.Parameter(cuda(*s)) for s in ((24, 64), (64, 24), (5000,)))
        opt = GaLoreAdamW([{"params": [left, right], "rank": 8, "update_proj_gap": 2}, {"params": [dense]}],
                          lr=1e-3, config=GaLoreConfig(weight_decay=0.1, bits=bits, svd=svd, moments=moments,
                                                       stagger=True, micro_batches=2, min_8bit_size=256))
        updater = GaLoreUpdater(opt, max_grad_norm=1.0, layerwise=layerwise)
        for _ in range(4):  # a first basis, refreshes at the staggered phases, moment policies
            for _ in range(2):
                for p in (left, right, dense):
                    p.grad = cuda(*p.shape) if p.grad is None or layerwise else p.grad + cuda(*p.shape)
                if layerwise:  # what the post-accumulate-grad hooks do
                    for p in (left, right, dense):
                        opt.absorb_grad(p)
                elif svd in ("sketch", "first_micro_batch"):  # the gradient hooks of ordinary mode
                    for p in (left, right):
                        (opt.sketch_grad if svd == "sketch" else lambda q, g: opt.take_initial_basis(q))(p, p.grad)
            updater.set_lr(1e-3)
            measured = updater.step()
            assert all(v.device.type == "cuda" for v in measured.values())
        for p in (left, right, dense):
            assert p.device.type == "cuda"
            for value in opt.state[p].values():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    assert value.device.type == "cuda"
        updater.close()


def test_torch_adamw_updater_steps_on_the_device():
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = [torch.nn.Parameter(cuda(32, 16)), torch.nn.Parameter(cuda(16))]
        updater = StandardUpdater(torch.optim.AdamW(params, lr=1e-3, foreach=False), params, max_grad_norm=1.0)
        for _ in range(2):
            for p in params:
                p.grad = cuda(*p.shape)
            assert updater.step()["grad_norm"].device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_draws_its_bits_on_the_device(dtype):
    with FakeTensorMode(allow_non_fake_inputs=True):
        rounding = StochasticRounding(seed=0)
        x = cuda(64, 32)
        assert rounding.to_dtype(x, dtype).device.type == "cuda"
        assert rounding.to_grid(x).device.type == "cuda"
