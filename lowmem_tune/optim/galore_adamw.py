"""GaLore-AdamW (32-bit and 8-bit moments) and Fira, as one torch optimizer.

Param groups are galore-torch compatible: a group with `rank` (and optionally `update_proj_gap`,
`scale`, `proj_type`, `svd`) is a GaLore group, and its 2-D parameters run Adam in a rank-r
subspace of their gradient (see `GaLoreProjector`); every other parameter gets plain AdamW.

Adam with 32-bit moments follows galore-torch 1.0 (the HF AdamW it copies): step size
lr * sqrt(1 - b2^t) / (1 - b1^t), denominator sqrt(v) + eps, decoupled weight decay
W <- W - lr wd W after the update. The 8-bit path is bitsandbytes' kernel, which adds eps to the
bias-corrected sqrt(v) and decays before the update (torch.optim.AdamW's convention). The eps
placement matters more than it looks: Adam normalizes every coordinate, and a low-rank gradient
has many small coordinates, so matching the reference exactly is what makes the parity hold.

bits=8: the two moments of every tensor with at least `min_8bit_size` elements are stored blockwise
8-bit (uint8 + one fp32 absmax per 256 values, bitsandbytes' dynamic maps) and updated by
`bitsandbytes.functional.optimizer_update_8bit_blockwise`: for a GaLore matrix the kernel runs on the
low-rank gradient and writes the normalized direction into a zero low-rank buffer (lr = -1), which
is then projected back into the weight with addmm_ — no weight clone, no device synchronize, the
same code on CPU and CUDA. Under FakeTensorMode the kernel call is skipped (same-shape states).

Moments when a matrix's subspace changes (`moments=`):
- keep: leave m and v as they are (galore-torch's behaviour; they are in the old basis).
- project: rotate the first moment into the new basis, m <- A m B with A = Pnewᵀ Pold (B likewise
  on the right), and carry v with the squared rotation, v <- (A∘A) v (B∘B) — the exact map of
  per-coordinate second moments when the old coordinates are uncorrelated.
- reset: zero both moments and restart the bias correction.
Measured with `benchmarks/optimizer_step.py --moments` (tiny Llama, Markov-chain next-token task,
rank 8, T 10, 150 steps, 3 seeds; mean loss of the last 20 steps): keep 1.491, reset 1.503,
project 1.524 — keep won on every seed, so `keep` stays the default (profile `strategy.moments`).

Fira (`variant="fira"`, Chen et al. 2024): update = scale * P N + phi ⊙ S where S = G - P Pᵀ G is the
gradient outside the subspace, phi the ratio ||N|| / ||R|| of the Adam-normalized low-rank update to
the low-rank gradient, per column of R (left projector) or per row (right projector), and a limiter
that keeps ||phi ⊙ S|| within `fira_limiter` (gamma = 1.01) times its previous value. Differences from
the reference code: S is the exact orthogonal complement G - P Pᵀ G (the reference subtracts
scale * P Pᵀ G, which is only the complement when scale = 1), and a column with ||R|| = 0 gets
phi = 0 rather than ||N|| / 1e-8. Fira needs the full accumulated gradient at the step, so its
matrices keep their gradient until `step()` even in layerwise mode.

Where a basis comes from (one rule for both ways of feeding gradients):
- a matrix without a usable basis (its first step, or back after `release`) takes it from the
  gradient of the first micro-batch of that step, as soon as that gradient exists
  (`take_initial_basis(p)`, run from a post-accumulate-grad hook by `GaLoreUpdater` in both modes),
  so it can project that micro-batch and every later one; it is not refreshed again at that step;
- a scheduled refresh (every T steps at the matrix's phase) uses the full gradient accumulated over
  the step, at `step()`.
With one micro-batch per step the two coincide. An optimizer driven without hooks (p.grad set by
hand, then `step()`) has only the accumulated gradient, and takes a missing basis from it.

Gradients reach the optimizer in one of two ways, with the same result:
- `step()` / `step_clipped()` read p.grad (the ordinary, non-layerwise way);
- `absorb_grad(p)` (called from a post-accumulate-grad hook by `GaLoreUpdater(layerwise=True)`)
  projects a micro-batch gradient into a low-rank fp32 accumulator and frees it at once; matrices
  whose projector has a scheduled refresh at the coming step (and Fira matrices) keep their full
  gradient instead. A matrix that just took its first basis is absorbed like any other, so step 0
  (and a layer returning to a LISA/OwLore sample) holds no more full gradients than a later step.

Gradient clipping (`step_clipped(max_norm)`) uses the norm of the gradient the optimizer consumes:
the projected (accumulated) gradient R for a GaLore matrix, the full gradient for other tensors.
This is exact in both modes and for any accumulation k, so layerwise and ordinary stepping follow
the same trajectory. The norm of the full gradient (including the part outside the subspaces) is
reported as well where it is exact: whenever no GaLore matrix absorbed more than one micro-batch.

State is created on a parameter's first gradient; `release(params, offload)` drops (or moves to the
CPU) everything held for those parameters, and a parameter that comes back takes a new basis from
its first micro-batch gradient (the rule above).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from lowmem_tune.optim.projector import GaLoreProjector, is_fake

MOMENT_POLICIES = ("keep", "project", "reset")
VARIANTS = ("galore", "fira")
BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer states (CPU and CUDA)
_TRANSIENT = ("grad_acc", "full_sq", "micro", "basis_taken")


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bits: int = 32,
        moments: str = "keep",
        variant: str = "galore",
        fira_limiter: float = 1.01,
        stagger: bool = False,
        min_8bit_size: int = 4096,
        param_names: Mapping[torch.nn.Parameter, str] | None = None,
    ) -> None:
        if bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {bits}")
        if moments not in MOMENT_POLICIES:
            raise ValueError(f"moments must be one of {MOMENT_POLICIES}, got {moments!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.bits = bits
        self.moments = moments
        self.variant = variant
        self.fira_limiter = fira_limiter
        self.stagger = stagger
        self.min_8bit_size = min_8bit_size
        self.global_step = 0
        self.refreshed_last_step = 0
        self._initial_bases = 0  # taken by take_initial_basis since the last step
        self._names = {id(p): name for p, name in (param_names or {}).items()}
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        galore = [p for g in self.param_groups if "rank" in g for p in g["params"] if p.ndim == 2]
        # Phases spread the SVDs of n matrices evenly over T steps (stagger) or put them all on 0.
        self._ordinal = {id(p): i for i, p in enumerate(galore)}
        self._phase = {id(p): (i * self._group_of(p)["update_proj_gap"]) // len(galore) if stagger else 0
                       for i, p in enumerate(galore)}

    # ------------------------------------------------------------------ bookkeeping
    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                group.setdefault("update_proj_gap", 200)
                return group
        raise KeyError("parameter not in this optimizer")

    def is_galore(self, p: torch.Tensor) -> bool:
        return id(p) in self._phase

    def name_of(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), f"param{self._index()[id(p)]}")

    def _index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(self._params())}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _qmap(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            import bitsandbytes.functional as F

            self._qmaps[device] = (F.create_dynamic_map(signed=True).to(device),
                                   F.create_dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    def _uses_8bit(self, shape: tuple[int, ...]) -> bool:
        return self.bits == 8 and math.prod(shape) >= self.min_8bit_size

    def _new_moments(self, shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        if self._uses_8bit(shape):
            blocks = -(-math.prod(shape) // BLOCKSIZE)
            return {"exp_avg": torch.zeros(shape, dtype=torch.uint8, device=device),
                    "exp_avg_sq": torch.zeros(shape, dtype=torch.uint8, device=device),
                    "absmax1": torch.zeros(blocks, dtype=torch.float32, device=device),
                    "absmax2": torch.zeros(blocks, dtype=torch.float32, device=device)}
        return {"exp_avg": torch.zeros(shape, dtype=torch.float32, device=device),
                "exp_avg_sq": torch.zeros(shape, dtype=torch.float32, device=device)}

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        """The parameter's state, created on first use and brought back from the CPU if offloaded."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            shape = tuple(p.shape)
            if self.is_galore(p):
                group = self._group_of(p)
                proj = GaLoreProjector(shape, group["rank"], group["update_proj_gap"], group.get("scale", 1.0),
                                       group.get("proj_type", "std"), group.get("svd", "full"),
                                       self._phase[id(p)], self.name_of(p))
                state["projector"] = proj
                shape = proj.low_rank_shape()
            state.update(self._new_moments(shape, p.device))
        elif state.get("offloaded"):
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(p.device)
            if "projector" in state:
                state["projector"].to(p.device)
                state["projector"].stale = True
            state["offloaded"] = False
        return state

    # ------------------------------------------------------------------ gradients in
    def keeps_full_grad(self, p: torch.Tensor) -> bool:
        """Whether p's full gradient must survive until step(): non-GaLore tensors, Fira matrices,
        and matrices with a scheduled refresh at the coming step. A matrix without a basis is not
        one of them: it takes its basis from the first micro-batch gradient (take_initial_basis)."""
        if not self.is_galore(p) or self.variant == "fira":
            return True
        state = self._state(p)
        proj: GaLoreProjector = state["projector"]
        if proj.needs_basis() or "basis_taken" in state:
            return False
        return proj.due(self.global_step)

    @torch.no_grad()
    def take_initial_basis(self, p: torch.Tensor) -> None:
        """Give a GaLore matrix without a usable basis one from p.grad, which holds the first
        micro-batch gradient of the step when this runs from a post-accumulate-grad hook."""
        if p.grad is None or not self.is_galore(p):
            return
        state = self._state(p)
        if state["projector"].needs_basis():
            self._refresh(p, state, p.grad)
            state["basis_taken"] = True
            self._initial_bases += 1

    @torch.no_grad()
    def absorb_grad(self, p: torch.Tensor) -> None:
        """Fold p.grad (one micro-batch) into the low-rank accumulator and free it, unless the full
        gradient is needed at the step."""
        self.take_initial_basis(p)
        if p.grad is None or self.keeps_full_grad(p):
            return
        state = self._state(p)
        grad = p.grad
        low = state["projector"].project(grad).float()
        if "grad_acc" in state:
            state["grad_acc"].add_(low)
            state["full_sq"].add_(_sq_norm(grad))
            state["micro"] += 1
        else:
            state["grad_acc"], state["full_sq"], state["micro"] = low, _sq_norm(grad), 1
        p.grad = None

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_clipped(None)
        return loss

    @torch.no_grad()
    def step_clipped(self, max_norm: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over every parameter with a gradient; clears the gradients.

        Returns (norm of the consumed gradient, before clipping; norm of the full gradient or None
        where it is not exact), both as 0-d tensors so the caller decides when to synchronize."""
        step = self.global_step
        pending: list[tuple[torch.Tensor, dict[str, Any], dict[str, Any], torch.Tensor]] = []
        consumed_sq: list[torch.Tensor] = []
        full_sq: list[torch.Tensor] = []
        full_exact = True
        refreshed, self._initial_bases = self._initial_bases, 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if p.grad is None and not (state and "grad_acc" in state):
                    continue
                state = self._state(p)
                if not self.is_galore(p):
                    grad = p.grad
                    consumed_sq.append(_sq_norm(grad))
                    full_sq.append(consumed_sq[-1])
                    pending.append((p, group, state, grad))
                    continue
                proj: GaLoreProjector = state["projector"]
                basis_taken = state.pop("basis_taken", False)
                low = state.pop("grad_acc", None)
                if "full_sq" in state:
                    full_sq.append(state.pop("full_sq"))
                    full_exact &= state.pop("micro") <= 1
                if p.grad is not None:
                    full_sq.append(_sq_norm(p.grad))
                    if not basis_taken and proj.due(step):
                        self._refresh(p, state, p.grad)
                        refreshed += 1
                    projected = proj.project(p.grad).float()
                    low = projected if low is None else low.add_(projected)
                    if self.variant != "fira":
                        p.grad = None
                consumed_sq.append(_sq_norm(low))
                pending.append((p, group, state, low))
        if not pending:
            zero = torch.zeros(())
            return zero, zero
        consumed = torch.stack(consumed_sq).sum().sqrt()
        full = torch.stack(full_sq).sum().sqrt() if full_exact else None
        coef = None
        if max_norm is not None:
            coef = (max_norm / (consumed + 1e-6)).clamp(max=1.0)
        for p, group, state, grad in pending:
            if coef is not None:
                grad.mul_(coef.to(grad.device, grad.dtype))
                if p.grad is not None and p.grad is not grad:
                    p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
            if self.is_galore(p):
                self._update_galore(p, group, state, grad)
            else:
                self._update_dense(p, group, state, grad)
            p.grad = None
        self.global_step += 1
        self.refreshed_last_step = refreshed
        return consumed, full

    def _refresh(self, p: torch.Tensor, state: dict[str, Any], grad: torch.Tensor) -> None:
        proj: GaLoreProjector = state["projector"]
        first = proj.left is None and proj.right is None
        # Staggered schedules compute a first basis cheaply (randomized SVD) so step 0 is not a stall;
        # each matrix gets its regular SVD at its own phase.
        seed = self.global_step * len(self._phase) + self._ordinal[id(p)]
        old_left, old_right = proj.refresh(grad, method="randomized" if first and self.stagger else None, seed=seed)
        if first or self.moments == "keep" or state["step"] == 0:
            return
        if self.moments == "reset":
            state.update(self._new_moments(tuple(state["exp_avg"].shape), p.device))
            state["step"] = 0
            return
        a, b = proj.rotation(old_left, old_right)
        m, v = self._read_moments(state)
        if a is not None:
            m, v = a @ m, a.square() @ v
        if b is not None:
            m, v = m @ b, v @ b.square()
        self._write_moments(state, m, v)

    def _read_moments(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if state["exp_avg"].dtype == torch.float32:
            return state["exp_avg"], state["exp_avg_sq"]
        if is_fake(state["exp_avg"]):
            like = state["exp_avg"]
            return like.new_empty(like.shape, dtype=torch.float32), like.new_empty(like.shape, dtype=torch.float32)
        import bitsandbytes.functional as F

        signed, unsigned = self._qmap(state["exp_avg"].device)
        m = F.dequantize_blockwise(state["exp_avg"], absmax=state["absmax1"], code=signed, blocksize=BLOCKSIZE)
        v = F.dequantize_blockwise(state["exp_avg_sq"], absmax=state["absmax2"], code=unsigned, blocksize=BLOCKSIZE)
        return m.float(), v.float()

    def _write_moments(self, state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
        if state["exp_avg"].dtype == torch.float32:
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v.clamp_(min=0))
            return
        if is_fake(m):
            return
        import bitsandbytes.functional as F

        signed, unsigned = self._qmap(m.device)
        q1, s1 = F.quantize_blockwise(m.contiguous(), code=signed, blocksize=BLOCKSIZE)
        q2, s2 = F.quantize_blockwise(v.clamp_(min=0).contiguous(), code=unsigned, blocksize=BLOCKSIZE)
        state["exp_avg"].copy_(q1)
        state["exp_avg_sq"].copy_(q2)
        state["absmax1"].copy_(s1.absmax)
        state["absmax2"].copy_(s2.absmax)

    def _adam_direction(self, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """Update the moments with a float32 low-rank gradient; returns m̂ / (sqrt(v̂) + eps)."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"]
        if state["exp_avg"].dtype == torch.uint8:
            direction = torch.zeros_like(grad)
            self._bnb_update(group, state, grad, direction, lr=-1.0, weight_decay=0.0)
            return direction
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        return (m / v.sqrt().add_(group["eps"])).mul_(step_size)

    def _bnb_update(self, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor,
                    target: torch.Tensor, lr: float, weight_decay: float) -> None:
        """bitsandbytes' blockwise 8-bit Adam step: target += -lr * m̂ / (sqrt(v̂) + eps)."""
        if is_fake(grad):
            return
        import bitsandbytes.functional as F

        beta1, beta2 = group["betas"]
        signed, unsigned = self._qmap(grad.device)
        F.optimizer_update_8bit_blockwise(
            "adam", grad, target, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, 0.0, 0.0,
            group["eps"], state["step"], lr, signed, unsigned, state["absmax1"], state["absmax2"],
            weight_decay=weight_decay,
        )

    def _update_dense(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if state["exp_avg"].dtype == torch.uint8:
            state["step"] += 1
            self._bnb_update(group, state, grad, p, lr=lr, weight_decay=wd)
            return
        direction = self._adam_direction(group, state, grad.float())
        p.add_(direction.to(p.dtype), alpha=-lr)
        if wd:
            p.add_(p, alpha=-lr * wd)

    def _update_galore(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], low: torch.Tensor) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        proj: GaLoreProjector = state["projector"]
        direction = self._adam_direction(group, state, low)
        if self.variant == "fira":
            p.add_(self._fira_residual(state, proj, p.grad, low, direction).to(p.dtype), alpha=-lr)
        proj.add_update_(p, direction, alpha=-lr)
        if wd:
            p.add_(p, alpha=-lr * wd)

    def _fira_residual(self, state: dict[str, Any], proj: GaLoreProjector, grad: torch.Tensor,
                       low: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """phi ⊙ (G - P Pᵀ G), limited to fira_limiter times the previous step's norm."""
        residual = grad.float() - proj.project_back(low).float()
        if proj.sides == ("left",):
            dim = 0  # R is r x n: one ratio per column
        elif proj.sides == ("right",):
            dim = 1  # R is m x r: one ratio per row
        else:
            dim = None
        n_norm = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
        r_norm = torch.linalg.vector_norm(low, dim=dim, keepdim=True)
        phi = torch.where(r_norm > 0, n_norm / r_norm.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        residual.mul_(phi)
        norm = torch.linalg.vector_norm(residual)
        prev = state.get("fira_prev")
        if prev is not None:
            factor = (self.fira_limiter * prev / norm.clamp(min=torch.finfo(torch.float32).tiny)).clamp(max=1.0)
            residual.mul_(factor)
            norm = norm * factor
        state["fira_prev"] = norm
        return residual

    # ------------------------------------------------------------------ lifecycle
    def release(self, params: Iterable[torch.Tensor], offload: bool = False) -> None:
        """Drop (or move to the CPU) gradients, moments, accumulators and projectors of `params`."""
        for p in params:
            p.grad = None
            state = self.state.get(p)
            if not state:
                continue
            if not offload:
                del self.state[p]
                continue
            for key in _TRANSIENT:
                state.pop(key, None)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to("cpu")
            if "projector" in state:
                state["projector"].to("cpu")
            state["offloaded"] = True

    def state_bytes(self, offloaded: bool = False) -> int:
        """Bytes held for parameters on their device (or, with offloaded=True, parked on the CPU)."""
        total = 0
        for state in self.state.values():
            if bool(state.get("offloaded")) != offloaded:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
                elif isinstance(value, GaLoreProjector):
                    total += value.nbytes()
        return total

    def next_refresh_in(self) -> int | None:
        """Steps until the next projector refresh among matrices that have state."""
        waits = [s["projector"].steps_to_refresh(self.global_step) for s in self.state.values() if "projector" in s]
        return min(waits) if waits else None

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        index = self._index()
        states = {}
        for p, state in self.state.items():
            flat = {}
            for key, value in state.items():
                if key in _TRANSIENT:
                    continue
                if isinstance(value, GaLoreProjector):
                    flat.update({f"projector.{k}": v for k, v in value.state_dict().items()})
                else:
                    flat[key] = value
            states[index[id(p)]] = flat
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        return {"global_step": self.global_step, "state": states, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        params = self._params()
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("optimizer state does not match these parameter groups")
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.global_step = int(state_dict["global_step"])
        self.state.clear()
        for idx, flat in state_dict["state"].items():
            p = params[int(idx)]
            device = torch.device("cpu") if flat.get("offloaded") else p.device
            state = self.state[p]
            proj_state = {}
            for key, value in flat.items():
                if isinstance(value, torch.Tensor):
                    value = value.to(device)
                if key.startswith("projector."):
                    proj_state[key.split(".", 1)[1]] = value
                else:
                    state[key] = value
            if proj_state:
                group = self._group_of(p)
                proj = GaLoreProjector(tuple(p.shape), group["rank"], group["update_proj_gap"],
                                       group.get("scale", 1.0), group.get("proj_type", "std"),
                                       group.get("svd", "full"), self._phase[id(p)], self.name_of(p))
                proj.load_state_dict(proj_state)
                state["projector"] = proj


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared norm, accumulated in at least float32 (no full-size upcast copy of a bf16 gradient)."""
    wide = torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else None
    return torch.linalg.vector_norm(t, dtype=wide).float().square()
