"""Adam's two moments in one of two storages, behind one interface.

- `Fp32Moments`: float32 m and v, Adam as galore-torch 1.0 does it (the HF AdamW it copies):
  step size sqrt(1 - b2^t) / (1 - b1^t), denominator sqrt(v) + eps.
- `Blockwise8bitMoments`: uint8 m and v with one float32 absmax per 256 values, updated by
  bitsandbytes' blockwise kernel (its dynamic quantile maps), which adds eps to the bias-corrected
  sqrt(v). The kernel can write the normalized direction into a zero buffer (lr = -1), which is
  how GaLore uses it on a low-rank gradient, or update a weight itself.
The eps placement matters more than it looks: Adam normalizes every coordinate, and a low-rank
gradient has many small coordinates, so matching each reference is what makes parity hold.

A parameter's state is a plain dict of tensors ("step" included), so it checkpoints as is;
`storage_of(state)` tells which storage holds it. Under FakeTensorMode (`plan --verify`) the
8-bit kernel is skipped: shapes and dtypes are real, values are not.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

from lowmem_tune.optim.projector import as_contiguous, is_fake

BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer states (CPU and CUDA)
MIN_8BIT_SIZE = 4096  # smaller tensors keep float32 moments, as in bitsandbytes' optimizers
KERNEL_PIECE = 1 << 20  # values per call of the 8-bit kernel (a multiple of BLOCKSIZE)


class Fp32Moments:
    @staticmethod
    def create(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """float32 moments (float64 for a float64 parameter)."""
        return {"exp_avg": torch.zeros(shape, dtype=dtype, device=device),
                "exp_avg_sq": torch.zeros(shape, dtype=dtype, device=device)}

    @staticmethod
    def read(state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return state["exp_avg"], state["exp_avg_sq"]

    @staticmethod
    def write(state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
        state["exp_avg"], state["exp_avg_sq"] = m, v.clamp_(min=0)

    @staticmethod
    def direction(state: dict[str, Any], grad: torch.Tensor, betas: tuple[float, float], eps: float) -> torch.Tensor:
        """Update the moments with a float32 gradient; returns m̂ / (sqrt(v̂) + eps)."""
        return Fp32Moments.rows_direction(state, betas, eps)(grad, 0, grad.shape[0])

    @staticmethod
    def rows_direction(state: dict[str, Any], betas: tuple[float, float],
                       eps: float) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
        """Advance the step; returns direction(grad_rows, start, rows), which updates rows start ..
        start + rows of the moments with those of the gradient (any dtype) and returns their
        m̂ / (sqrt(v̂) + eps): a tensor stepped a block at a time needs no full-size float32 copy."""
        beta1, beta2 = betas
        state["step"] += 1
        step_size = bias_correction(state["step"], betas)

        def direction(grad: torch.Tensor, start: int, rows: int) -> torch.Tensor:
            m, v = state["exp_avg"].narrow(0, start, rows), state["exp_avg_sq"].narrow(0, start, rows)
            grad = grad.to(m.dtype)
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            return (m / v.sqrt().add_(eps)).mul_(step_size)

        return direction


def bias_correction(step: int, betas: tuple[float, float]) -> float:
    """sqrt(1 - b2^t) / (1 - b1^t): the factor on m / (sqrt(v) + eps) at step t (both storages)."""
    return math.sqrt(1 - betas[1] ** step) / (1 - betas[0] ** step)


@functools.cache
def dynamic_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' signed and unsigned dynamic quantile maps on `device` (constants, 2 KiB each)."""
    import bitsandbytes.functional as F

    return F.create_dynamic_map(signed=True).to(device), F.create_dynamic_map(signed=False).to(device)


class Blockwise8bitMoments:
    @staticmethod
    def create(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        blocks = -(-math.prod(shape) // BLOCKSIZE)
        return {"exp_avg": torch.zeros(shape, dtype=torch.uint8, device=device),
                "exp_avg_sq": torch.zeros(shape, dtype=torch.uint8, device=device),
                "absmax1": torch.zeros(blocks, dtype=torch.float32, device=device),
                "absmax2": torch.zeros(blocks, dtype=torch.float32, device=device)}

    @staticmethod
    def read(state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        like = state["exp_avg"]
        if is_fake(like):
            return like.new_empty(like.shape, dtype=torch.float32), like.new_empty(like.shape, dtype=torch.float32)
        import bitsandbytes.functional as F

        signed, unsigned = dynamic_maps(like.device)
        m = F.dequantize_blockwise(like, absmax=state["absmax1"], code=signed, blocksize=BLOCKSIZE)
        v = F.dequantize_blockwise(state["exp_avg_sq"], absmax=state["absmax2"], code=unsigned, blocksize=BLOCKSIZE)
        return m.float(), v.float()

    @staticmethod
    def write(state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
        if is_fake(m):
            return
        import bitsandbytes.functional as F

        signed, unsigned = dynamic_maps(m.device)
        q1, s1 = F.quantize_blockwise(m.contiguous(), code=signed, blocksize=BLOCKSIZE)
        q2, s2 = F.quantize_blockwise(v.clamp_(min=0).contiguous(), code=unsigned, blocksize=BLOCKSIZE)
        state.update(exp_avg=q1, exp_avg_sq=q2, absmax1=s1.absmax, absmax2=s2.absmax)

    @classmethod
    def direction(cls, state: dict[str, Any], grad: torch.Tensor, betas: tuple[float, float], eps: float) -> torch.Tensor:
        """Count a step and return the normalized direction m̂ / (sqrt(v̂) + eps), in float32."""
        state["step"] += 1
        direction = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        cls.update_range(state, as_contiguous(grad), direction, 0, betas, eps, lr=-1.0, weight_decay=0.0)
        return direction

    @classmethod
    def step_into(cls, state: dict[str, Any], grad: torch.Tensor, weight: torch.Tensor, betas: tuple[float, float],
                  eps: float, lr: float, weight_decay: float) -> None:
        """Count a step and update `weight` in place: w <- w (1 - lr wd) - lr m̂ / (sqrt(v̂) + eps)."""
        state["step"] += 1
        cls.update_range(state, grad, weight, 0, betas, eps, lr, weight_decay)

    @staticmethod
    def update_range(state: dict[str, Any], grad: torch.Tensor, target: torch.Tensor, start: int,
                     betas: tuple[float, float], eps: float, lr: float, weight_decay: float) -> None:
        """The kernel on values start .. start + grad.numel() of the tensor (start a multiple of
        BLOCKSIZE), at the step state["step"] already counts, written into `target`."""
        if is_fake(grad):
            return
        import bitsandbytes.functional as F

        signed, unsigned = dynamic_maps(grad.device)
        grad, target = grad.reshape(-1), target.view(-1)
        # A piece at a time: bitsandbytes' CPU kernel dequantizes both moments into float32 copies,
        # and for a 168M-value embedding those are 0.7 GB each, page-faulted in at every step (a
        # piece costs 5x less there). Pieces start on block boundaries, so the result is the same.
        for offset in range(0, grad.numel(), KERNEL_PIECE):
            n = min(KERNEL_PIECE, grad.numel() - offset)
            at = start + offset
            first, blocks = at // BLOCKSIZE, -(-n // BLOCKSIZE)
            F.optimizer_update_8bit_blockwise(
                "adam", grad.narrow(0, offset, n), target.narrow(0, offset, n),
                state["exp_avg"].view(-1).narrow(0, at, n), state["exp_avg_sq"].view(-1).narrow(0, at, n),
                betas[0], betas[1], 0.0, 0.0, eps, state["step"], lr, signed, unsigned,
                state["absmax1"].narrow(0, first, blocks), state["absmax2"].narrow(0, first, blocks),
                weight_decay=weight_decay,
            )


def moments_for(numel: int, bits: int, min_8bit_size: int = MIN_8BIT_SIZE) -> type:
    """The storage a tensor of `numel` values gets with `bits`-bit optimizer states."""
    return Blockwise8bitMoments if bits == 8 and numel >= min_8bit_size else Fp32Moments


def storage_of(state: dict[str, Any]) -> type:
    return Blockwise8bitMoments if state["exp_avg"].dtype == torch.uint8 else Fp32Moments


def carry_moments(state: dict[str, Any], policy: str, left: torch.Tensor | None, right: torch.Tensor | None) -> None:
    """What a matrix's moments become when its subspace changes (galore_adamw's `moments`):
    - keep: m and v as they are (galore-torch's behaviour; they are in the old basis).
    - project: the first moment rotated into the new basis, m <- A m B with A = Pnewᵀ Pold (B
      likewise on the right, `left` and `right` here), and v carried with the squared rotation,
      v <- (A∘A) v (B∘B): the exact map of per-coordinate second moments when the old coordinates
      are uncorrelated.
    - reset: both zeroed, the bias correction restarted.
    Measured with `benchmarks/optimizer_step.py --moments`: keep won (README), so it is the default."""
    if policy == "keep":
        return
    storage = storage_of(state)
    if policy == "reset":
        dtype = state["exp_avg"].dtype if storage is Fp32Moments else torch.float32
        state.update(storage.create(tuple(state["exp_avg"].shape), state["exp_avg"].device, dtype))
        state["step"] = 0
        return
    m, v = storage.read(state)
    if left is not None:
        m, v = left @ m, left.square() @ v
    if right is not None:
        m, v = m @ right, v @ right.square()
    storage.write(state, m, v)
