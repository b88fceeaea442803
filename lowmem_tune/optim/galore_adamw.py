"""GaLore-AdamW (32-bit and 8-bit moments) and Fira, as one torch optimizer (APOLLO: a subclass, apollo.py).

Param groups are galore-torch compatible: a group with `rank` (and optionally `update_proj_gap`,
`scale`, `proj_type`) is a GaLore group, and its 2-D parameters run Adam in a rank-r subspace of
their gradient (see `GaLoreProjector`); every other parameter gets plain AdamW. Adam itself is in
`moments.py` (float32, or bitsandbytes' blockwise 8-bit kernel for tensors of `min_8bit_size`
values or more with bits=8), Fira's residual in `fira.py`, where a subspace comes from
(`svd`: sketch, exact, randomized, first_micro_batch) in `subspace.py`. Decoupled weight decay
W <- W - lr wd W after the update, as galore-torch 1.0 (the 8-bit kernel on a dense tensor decays
before it, as torch.optim.AdamW). With `rounding`, updates into bf16/fp16 weights are rounded
stochastically (`writer.py`) instead of to nearest.

The moments at a change of subspace (`moments`: keep, project, reset): `carry_moments` (moments.py).

Gradients come from p.grad at `step()` (ordinary mode) or, one micro-batch at a time, through
`absorb_grad` in backward hooks (`layerwise.py`, which says what is kept when) or, between a
matrix's refreshes, straight from its layer's backward (`projected_grad.py`); clipping uses the
norm of the gradient the optimizer consumes (low-rank for GaLore matrices), exact in both modes.
With `average` (several processes) the step's gradient state is averaged across them first.

State appears on a parameter's first gradient, its moments at its first update (so a matrix
whose first basis waits for room holds none: see `SketchRoom`); `release(params, offload)` drops
(or parks on the CPU) everything held for those parameters, and a parameter that comes back takes a
new basis.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch

from lowmem_tune.optim.adam_step import dense_step, galore_step
from lowmem_tune.optim.galore_config import APOLLO_VARIANTS, GaLoreConfig
from lowmem_tune.optim.moments import carry_moments, moments_for
from lowmem_tune.optim.norms import is_one_on_cpu, squared_norm
from lowmem_tune.optim.offload import is_parked, park, tensor_bytes, unpark
from lowmem_tune.optim.persistence import TRANSIENT, galore_state_dict, load_galore_state_dict
from lowmem_tune.optim.projector import GaLoreProjector
from lowmem_tune.optim.rounding import StochasticRounding
from lowmem_tune.optim.subspace import RangeSketch, SketchRoom, low_rank_from_sketch, refresh
from lowmem_tune.optim.timing import SectionTimer
from lowmem_tune.optim.writer import RoundingWriter, WeightStore


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        config: GaLoreConfig = GaLoreConfig(),
        *,
        param_names: Mapping[torch.nn.Parameter, str] | None = None,
        rounding: StochasticRounding | None = None,
        inform: Callable[[str], None] | None = None,
        stores: Mapping[torch.nn.Parameter, WeightStore] | None = None,
        average: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": config.betas, "eps": config.eps,
                                  "weight_decay": config.weight_decay})
        if config.variant in APOLLO_VARIANTS and type(self) is GaLoreAdamW:
            raise ValueError(f"variant {config.variant!r} runs as ApolloAdamW (lowmem_tune/optim/apollo.py)")
        self.config = config
        # Fira keeps every full gradient for its residual anyway: its basis is their exact SVD.
        self.rule = "exact" if config.variant == "fira" and config.svd == "sketch" else config.svd
        if average is not None and config.svd == "first_micro_batch":
            raise ValueError("svd 'first_micro_batch' takes a basis from one process's gradient; with several "
                             "processes use 'sketch' or 'exact'")
        self.average = average
        self._stores = {id(p): store for p, store in (stores or {}).items()}
        self.writer = RoundingWriter(rounding) if rounding is not None else None
        self._inform, self._told = inform, False
        self.global_step = 0
        self.refreshed_last_step = 0
        self.refresh_timer = SectionTimer()
        self._refreshed = 0  # since the last step
        self.sketch_room = SketchRoom()
        self._names = {id(p): name for p, name in (param_names or {}).items()}
        galore = [p for g in self.param_groups if "rank" in g for p in g["params"] if p.ndim == 2]
        for group in (g for g in self.param_groups if "rank" in g):
            group.setdefault("update_proj_gap", 200)
            if self.rule == "sketch" and group.get("proj_type", "std") == "full":
                raise ValueError("svd 'sketch' needs a one-sided projector; proj_type 'full' takes svd 'exact'")
        self._group = {id(p): g for g in self.param_groups for p in g["params"]}
        # Phases spread the SVDs of n matrices evenly over T steps (stagger) or put them all on 0.
        self._ordinal = {id(p): i for i, p in enumerate(galore)}
        self._phase = {id(p): (i * self._group[id(p)]["update_proj_gap"]) // len(galore) if config.stagger else 0
                       for i, p in enumerate(galore)}

    # ------------------------------------------------------------------ bookkeeping
    def is_galore(self, p: torch.Tensor) -> bool:
        return id(p) in self._phase

    def name_of(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), f"param{self.param_index()[id(p)]}")

    def param_index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(self.params())}

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def new_projector(self, p: torch.Tensor) -> GaLoreProjector:
        return GaLoreProjector.for_group(self._group[id(p)], tuple(p.shape), self._phase[id(p)], self.name_of(p))

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        """The parameter's state, created on first use and brought back from the CPU if parked."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            if self.is_galore(p):
                state["projector"] = self.new_projector(p)
        elif is_parked(state):
            self.state[p] = state = unpark(state, p.device)
            if "projector" in state:
                state["projector"].stale = True
        return state

    def _moments_of(self, p: torch.Tensor) -> tuple[type, tuple[int, ...], torch.dtype]:
        """The storage, shape (low-rank for a GaLore matrix) and dtype of p's moments."""
        shape = self.new_projector(p).low_rank_shape() if self.is_galore(p) else tuple(p.shape)
        storage = moments_for(math.prod(shape), self.config.bits, self.config.min_8bit_size)
        return storage, shape, torch.promote_types(p.dtype, torch.float32)

    def _seed(self, p: torch.Tensor) -> int:
        return self.global_step * len(self._phase) + self._ordinal[id(p)]

    def _tell(self, message: str) -> None:
        """Rank-deficiency notices: the first one, once per run."""
        if self._inform is not None and not self._told:
            self._told = True
            self._inform(message + " (said once; other matrices may do the same)")

    # ------------------------------------------------------------------ gradients in
    def keeps_full_grad(self, p: torch.Tensor) -> bool:
        """Whether p's full gradient must survive until step(): non-GaLore tensors, Fira matrices,
        and matrices taking a basis from the accumulated gradient (rules exact, randomized, and
        first_micro_batch's scheduled refreshes)."""
        if not self.is_galore(p) or self.config.variant != "galore":
            return True
        state = self._state(p)
        proj: GaLoreProjector = state["projector"]
        if self.rule == "sketch":
            return False
        if self.rule == "first_micro_batch":
            return not (proj.needs_basis() or "basis_taken" in state) and proj.due(self.global_step)
        return proj.due(self.global_step)

    @torch.no_grad()
    def take_initial_basis(self, p: torch.Tensor) -> None:
        """Rule first_micro_batch: a matrix without a basis takes one from p.grad, which holds the
        first micro-batch's gradient when this runs from a post-accumulate-grad hook."""
        if self.rule != "first_micro_batch" or p.grad is None or not self.is_galore(p):
            return
        state = self._state(p)
        if state["projector"].needs_basis():
            self._refresh(p, state, p.grad)
            state["basis_taken"] = True

    @torch.no_grad()
    def sketch_grad(self, p: torch.Tensor, grad: torch.Tensor) -> bool:
        """Rule sketch: add one micro-batch's gradient to the sketch of a matrix that takes a basis
        at this step; whether it took the gradient. After the step's last micro-batch (`micro_batches`) the
        basis and the step's low-rank gradient are taken at once, so with one micro-batch per
        step only one matrix's sketch is ever alive. Both modes call this once per micro-batch
        (ordinary mode from a gradient hook), so both build the very same sketch."""
        if self.rule != "sketch" or not self.is_galore(p):
            return False
        state = self._state(p)
        proj: GaLoreProjector = state["projector"]
        if "basis_taken" in state:  # more micro-batches than expected: project them, in both modes
            state["grad_acc"].add_(_low_rank(proj, grad))
            return True
        if "deferred" in state:
            return True  # its first basis waits for a later step; this step's gradient is dropped
        if not proj.due(self.global_step):
            return False
        if "sketch" not in state:
            d, big = proj.orient(grad).shape
            sketch = RangeSketch(d, big, proj.rank, self._seed(p), grad)
            lives_on = self.config.micro_batches > 1 or self.average is not None  # not turned into a basis in the hook
            if proj.needs_basis() and lives_on and not self._room_for(sketch.nbytes()):
                state["deferred"] = True
                return True
            state["sketch"] = sketch
        state["sketch"].add(proj.orient(grad))
        if state["sketch"].micro_batches == self.config.micro_batches and self.average is None:
            self._finish_sketch(p, state)  # several processes: at the step, once the sketches are averaged
        return True

    def _room_for(self, nbytes: int) -> bool:
        def waiting() -> int:  # what the matrices still without a basis will hold once they have one
            return sum(self._bytes_to_come(q) for q in self.params()
                       if self.is_galore(q) and q.requires_grad and self._needs_basis(q))

        return self.sketch_room.admits(self.global_step, nbytes, waiting)

    def _bytes_to_come(self, p: torch.Tensor) -> int:
        """What a matrix without a basis adds on its device once it trains: its projector and
        accumulator, and its moments unless it has them (parked state brings its own back)."""
        held = self.new_projector(p).held_bytes(p.element_size())
        state = self.state.get(p)
        if not state or "exp_avg" not in state:  # sized by building them on the meta device
            storage, shape, dtype = self._moments_of(p)
            held += tensor_bytes(storage.create(shape, torch.device("meta"), dtype))
        return held

    def _needs_basis(self, p: torch.Tensor) -> bool:
        state = self.state.get(p)
        return not state or is_parked(state) or state["projector"].needs_basis()

    def _finish_sketch(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        q, x = state.pop("sketch").factors()
        self._refresh(p, state, (q, x))
        state["grad_acc"] = low_rank_from_sketch(state["projector"], q, x)
        state["basis_taken"] = True

    @torch.no_grad()
    def absorb_grad(self, p: torch.Tensor) -> None:
        """Consume p.grad (one micro-batch) into the matrix's sketch or low-rank accumulator and
        free it, unless the full gradient is needed at the step."""
        self.take_initial_basis(p)
        if p.grad is None or self.keeps_full_grad(p):
            return
        state = self._state(p)
        grad = p.grad
        if not self.sketch_grad(p, grad):
            low = _low_rank(state["projector"], grad)
            state["grad_acc"] = low if "grad_acc" not in state else state["grad_acc"].add_(low)
        squared = squared_norm(grad)
        state["full_sq"] = squared if "full_sq" not in state else state["full_sq"].add_(squared)
        state["micro"] = state.get("micro", 0) + 1
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
        if self.average is not None:
            self.average(self._gradient_state())
        pending: list[tuple[torch.Tensor, dict[str, Any], dict[str, Any], torch.Tensor]] = []
        consumed_sq: list[torch.Tensor] = []
        full_sq: list[torch.Tensor] = []
        full_exact = True
        for group in self.param_groups:
            for p in group["params"]:
                if self._steps_itself(p, group, consumed_sq, full_sq):
                    continue
                state = self.state.get(p)
                if p.grad is None and not (state and ("grad_acc" in state or "sketch" in state or "deferred" in state)):
                    continue
                state = self._state(p)
                if state.pop("deferred", False):  # no basis yet and no room for its sketch: next step
                    p.grad = None
                    state.pop("full_sq", None), state.pop("micro", None)
                    continue
                if self.is_galore(p):
                    low, full = self._low_rank_gradient(p, state)
                    full_sq.extend(full)
                    low_only = state.pop("low_only", False)  # projected in backward: no full norm
                    full_exact &= state.pop("micro", 0) <= 1 and not low_only
                    consumed_sq.append(squared_norm(low))
                else:
                    low = p.grad
                    consumed_sq.append(squared_norm(low))
                    full_sq.append(consumed_sq[-1])
                pending.append((p, group, state, low))
        self.refreshed_last_step, self._refreshed = self._refreshed, 0
        if not consumed_sq:
            zero = torch.zeros(())
            return zero, zero
        consumed = torch.stack(consumed_sq).sum().sqrt()
        # the full gradient's norm is exact for one micro-batch of one process only
        full = torch.stack(full_sq).sum().sqrt() if full_exact and self.average is None else None
        coef = None if max_norm is None else (max_norm / (consumed + 1e-6)).clamp(max=1.0)
        if coef is not None and is_one_on_cpu(coef):  # nothing clipped
            coef = None
        for p, group, state, grad in pending:
            self._ensure_moments(p, state)
            if coef is not None:
                grad.mul_(coef.to(grad.device, grad.dtype))
                if p.grad is not None and p.grad is not grad:
                    p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
            if self.is_galore(p):
                galore_step(p, group, state, grad, self.writer, self.config.variant == "fira",
                            self.config.fira_limiter, self._stores.get(id(p)))
            else:
                dense_step(p, group, state, grad, self.writer)
            p.grad = None
        self.global_step += 1
        return consumed, full

    def _steps_itself(self, p: torch.Tensor, group: dict[str, Any], consumed_sq: list[torch.Tensor],
                      full_sq: list[torch.Tensor]) -> bool:
        """Whether p took its whole step here, unclipped, its squared norms appended (APOLLO's matrices)."""
        return False

    def _ensure_moments(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        if "exp_avg" not in state:  # moments appear at the first update
            storage, shape, dtype = self._moments_of(p)
            state.update(storage.create(shape, p.device, dtype))

    def _gradient_state(self) -> list[torch.Tensor]:
        """What this process holds of the step's gradient: full gradients, low-rank accumulators and
        sketches — linear in the gradient, so their averages across processes are those of the
        whole batch. The same order in every process."""
        tensors = []
        for p in self.params():
            state = self.state.get(p) or {}
            tensors += [t for t in (p.grad, state.get("grad_acc")) if t is not None]
            if "sketch" in state:
                tensors += [t for t in (state["sketch"].y, state["sketch"].w) if t is not None]
        return tensors

    def _low_rank_gradient(self, p: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This step's low-rank gradient of a GaLore matrix, after any refresh it is due, and the
        squared norms of the full gradients it came from."""
        proj: GaLoreProjector = state["projector"]
        full = [state.pop("full_sq")] if "full_sq" in state else []
        if p.grad is not None:
            full.append(squared_norm(p.grad))
            if self.rule == "sketch":
                if "basis_taken" not in state and "sketch" not in state:  # driven without hooks
                    self.sketch_grad(p, p.grad)
            elif "basis_taken" not in state and proj.due(self.global_step):
                self._refresh(p, state, p.grad)
        if "sketch" in state:  # fewer micro-batches than `micro_batches`
            self._finish_sketch(p, state)
        low = state.pop("grad_acc", None)
        if p.grad is not None and not (self.rule == "sketch" and "basis_taken" in state):
            projected = _low_rank(proj, p.grad)
            low = projected if low is None else low.add_(projected)
        state.pop("basis_taken", None)
        if self.config.variant != "fira":
            p.grad = None
        return low, full

    def _refresh(self, p: torch.Tensor, state: dict[str, Any], gradient: torch.Tensor | tuple) -> None:
        proj: GaLoreProjector = state["projector"]
        first = proj.needs_basis()
        with self.refresh_timer.section(p.device):
            change = refresh(proj, gradient, self.rule, p.dtype, self._seed(p), self._tell)
        self._refreshed += 1
        if not (first or change.filled or state["step"] == 0):
            carry_moments(state, self.config.moments, *proj.rotation(change.old_left, change.old_right))

    # ------------------------------------------------------------------ lifecycle
    def release(self, params: Iterable[torch.Tensor], offload: bool = False) -> None:
        """Drop (or park on the CPU) gradients, moments, accumulators and projectors of `params`."""
        for p in params:
            p.grad = None
            state = self.state.get(p)
            if not state or is_parked(state):
                continue
            if not offload:
                del self.state[p]
                continue
            self.state[p] = park({k: v for k, v in state.items() if k not in TRANSIENT})

    def state_bytes(self, offloaded: bool = False) -> int:
        """Bytes held for parameters on their device (or, with offloaded=True, parked on the CPU)."""
        return sum(tensor_bytes(state) for state in self.state.values() if is_parked(state) == offloaded)

    def next_refresh_in(self) -> int | None:
        """Steps until the next projector refresh among matrices that have state."""
        waits = [s["projector"].steps_to_refresh(self.global_step) for s in self.state.values() if "projector" in s]
        return min(waits) if waits else None

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return galore_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        load_galore_state_dict(self, state_dict)


def _low_rank(proj: GaLoreProjector, grad: torch.Tensor) -> torch.Tensor:
    """The projected gradient in at least float32 (float64 gradients keep their precision)."""
    return proj.project(grad).to(torch.promote_types(grad.dtype, torch.float32))
