"""Stochastic rounding: the one routine every update uses to write into a coarser number format.

A value x between two neighbours lo < x < hi of the target grid becomes hi with probability
(x - lo) / (hi - lo) and lo otherwise, so E[round(x)] = x. A step far smaller than the grid's
spacing therefore still moves a weight in expectation, where rounding to nearest would drop it:
GaLore's update at lr 1e-5 and scale 0.25 moves a bf16 weight of 0.02 by much less than half its
ulp (~6e-5). Grids: bfloat16 and float16 weights, and the integer codes of INT8 weights.

Randomness comes from one generator per device type, seeded from the run's seed; its state is in
the checkpoint, so a resumed run draws the same bits and stays bit-identical. Every process of a
data-parallel run draws the same bits (their weights stay equal), from the state process 0 saved.
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_tune.optim.projector import as_contiguous, is_fake

_LOW_HALF = -(1 << 16)  # 0xFFFF0000 as int32: keeps a float32's top 16 bits, the bfloat16 ones


class StochasticRounding:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._saved: dict[str, torch.Tensor] = {}
        """States loaded for devices whose generator is made on first use."""

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if device.type == "meta":
            return None
        key = device.type
        if key not in self._generators:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            if key in self._saved:
                generator.set_state(self._saved.pop(key))
            self._generators[key] = generator
        return self._generators[key]

    def uniform_like(self, x: torch.Tensor) -> torch.Tensor:
        """U[0, 1) in float32, shaped like x, from this device's generator."""
        generator = None if is_fake(x) else self._generator(x.device)
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)

    def _random_int16(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform int16 values (-2^15 .. 2^15 - 1) shaped like x: the four 16-bit quarters of 64-bit
        draws, a quarter of the generator's work of drawing each value on its own (on the CPU that
        drawing is sequential, and was the largest cost of a bf16 update)."""
        if is_fake(x):  # `plan --verify`: shapes, not values (and no device generator to draw from)
            return torch.empty(x.shape, dtype=torch.int16, device=x.device)
        words = torch.empty(-(-x.numel() // 4), dtype=torch.int64, device=x.device)
        words.random_(-(1 << 63), None, generator=self._generator(x.device))
        return words.view(torch.int16)[:x.numel()].view(x.shape)

    def to_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """float32 `x` rounded stochastically to `dtype` (bfloat16 or float16; float32 passes)."""
        if dtype == torch.float32:
            return x
        if dtype == torch.bfloat16:
            return self._bf16_bits(as_contiguous(x).clone()).to(torch.bfloat16)
        if dtype == torch.float16:
            near = x.to(torch.float16)
            gap = near.float() - x
            other = torch.nextafter(near, torch.where(gap > 0, -torch.inf, torch.inf).to(torch.float16))
            away = (other.float() - near.float()).abs()
            take_other = self.uniform_like(x) * away < gap.abs()
            return torch.where(take_other, other, near)
        raise ValueError(f"no stochastic rounding to {dtype}")

    def round_into(self, target: torch.Tensor, scratch: torch.Tensor) -> None:
        """target (bf16 / fp16) <- the float32 `scratch` rounded stochastically; `scratch` (a
        contiguous temporary of the caller's) is overwritten."""
        if target.dtype == torch.bfloat16:
            target.copy_(self._bf16_bits(scratch))  # its low 16 bits are zero: the conversion is exact
        else:
            target.copy_(self.to_dtype(scratch, target.dtype))

    def _bf16_bits(self, x: torch.Tensor) -> torch.Tensor:
        """x (contiguous float32, overwritten) with 16 random bits added to its magnitude and the
        low 16 truncated: bfloat16 is the top half of a float32, and the carry into bit 16
        happens with probability (x - lo) / (hi - lo)."""
        bits = x.view(torch.int32).add_(self._random_int16(x)).add_(1 << 15).bitwise_and_(_LOW_HALF)
        return bits.view(torch.float32)

    def to_grid(self, v: torch.Tensor) -> torch.Tensor:
        """float32 `v` rounded stochastically to whole numbers (INT8 weight codes): floor(v + U)."""
        return (v + self.uniform_like(v)).floor_()

    def state_dict(self) -> dict[str, Any]:
        states = {key: g.get_state() for key, g in self._generators.items()}
        return {"seed": self.seed, "generators": {**self._saved, **states}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generators.clear()
        # by device type (checkpoints before said "cuda:0"): process 1 on cuda:1 resumes the state
        # process 0 saved, the one every process shares
        self._saved = {torch.device(key).type: value for key, value in state["generators"].items()}
