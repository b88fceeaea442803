"""`plan --verify`: run a strategy's real code on fake tensors and measure the live bytes.

The model is built under torch's FakeTensorMode (shapes and dtypes, no storage, no GPU), the
strategy prepares it and builds its updater through the strategy interface, and we run what the
training loop runs: forward with labels, backward, per micro-batch, then `set_lr` and `step()`.
A TorchDispatchMode sees every tensor an op creates; it counts each new storage once, tagged with
what was running when it appeared, and a weakref finalizer takes it off when it dies. The peak and
the per-category bytes at that moment are the measurement.

What this does not see is CUDA's own cost (context, cuBLAS workspace, allocator slack); those are
in `hardware.reserve_bytes`, outside the estimate being checked.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from lowmem_tune.profile import Profile

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "logits", "overhead")


@dataclass
class VerifyResult:
    peak_bytes: int
    by_category: dict[str, int]
    peak_at: str
    """Where the peak happened, e.g. 'step 1 micro-batch 2 backward'."""
    seconds: float
    steps: int
    micro_batches: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "by_category": self.by_category, "peak_at": self.peak_at,
                "seconds": round(self.seconds, 2), "steps": self.steps, "micro_batches": self.micro_batches,
                "notes": self.notes}


def _memory_tracker_class():
    """Defined on first use so that importing this module does not import torch."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class MemoryTracker(TorchDispatchMode):
        """Live bytes per category, counted per storage; keeps the breakdown at the peak."""

        def __init__(self) -> None:
            super().__init__()
            self.category = "weights"
            self.where = "build"
            self.storages: dict[int, tuple[int, str]] = {}
            self.live: Counter[str] = Counter()
            self.total = 0
            self.peak = 0
            self.peak_by_category: dict[str, int] = {}
            self.peak_at = ""
            self.notes: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self._track(tensor)
            return out

        def _track(self, tensor) -> None:
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.storages:
                return  # a view, or an in-place op's result
            nbytes = storage.nbytes()
            self.storages[key] = (nbytes, self.category)
            self.live[self.category] += nbytes
            self.total += nbytes
            weakref.finalize(storage, self._free, key)
            if self.total > self.peak:
                self.peak = self.total
                self.peak_by_category = dict(self.live)
                self.peak_at = self.where

        def _free(self, key: int) -> None:
            nbytes, category = self.storages.pop(key)
            self.live[category] -= nbytes
            self.total -= nbytes

        def reclassify(self, tensor, category: str) -> None:
            """Move a live storage to another category (a gradient found after backward)."""
            key = tensor.untyped_storage()._cdata
            if key not in self.storages:
                return
            nbytes, old = self.storages[key]
            self.live[old] -= nbytes
            self.live[category] += nbytes
            self.storages[key] = (nbytes, category)

        def restart_peak(self) -> int:
            """Forget the peak so far (returned): what follows is measured on its own."""
            before, self.peak = self.peak, self.total
            self.peak_by_category, self.peak_at = dict(self.live), self.where
            return before

        @contextlib.contextmanager
        def phase(self, category: str, where: str) -> Iterator[None]:
            saved = self.category, self.where
            self.category, self.where = category, where
            try:
                yield
            finally:
                self.category, self.where = saved

    return MemoryTracker


@contextlib.contextmanager
def _bitsandbytes_maps_outside_fake_mode() -> Iterator[None]:
    """bitsandbytes builds its 8-bit quantile maps with data-dependent Python code (`.tolist()`),
    which FakeTensorMode cannot run; build those 2 KiB maps as real tensors. Its update kernels do
    have fake implementations, so 8-bit states keep their real dtypes and shapes."""
    try:
        import bitsandbytes.functional as F
    except ImportError:
        yield
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original = F.create_dynamic_map

    def real_map(*args, **kwargs):
        with unset_fake_temporarily():
            return original(*args, **kwargs)

    F.create_dynamic_map = real_map
    try:
        yield
    finally:
        F.create_dynamic_map = original


def verify_profile(profile: Profile, steps: int = 2, micro_batches: int | None = None) -> VerifyResult:
    """Measure the peak of `steps` optimizer steps of `profile` on fake tensors.

    Two steps, so that state created lazily at the first step is present through the second;
    `micro_batches` (default: min(gradient_accumulation, 2)) per step, so that whatever a strategy
    keeps between micro-batches is live while the next one runs.
    """
    import torch
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.errors import UserError
    from lowmem_tune.modeling import resolve_dtype
    from lowmem_tune.strategies import StrategyContext, build_strategy

    started = time.perf_counter()
    strategy = build_strategy(profile)  # UserError naming what exists when not built yet
    resolved = resolve_model(profile.model.name)
    config = resolved.config
    dtype = resolve_dtype(profile.model.dtype, torch.device("cuda")) if profile.model.dtype != "auto" else torch.bfloat16
    t = profile.train
    n_micro = micro_batches or min(t.gradient_accumulation, 2)
    tracker = _memory_tracker_class()()
    ctx = StrategyContext(device=torch.device("cpu"), dtype=dtype, fake=True)

    try:
        with _bitsandbytes_maps_outside_fake_mode(), FakeTensorMode(allow_non_fake_inputs=True), tracker:
            _run(profile, strategy, config, dtype, ctx, tracker, steps, n_micro)
    except DataDependentOutputException as err:
        raise UserError(
            f"plan --verify: strategy {profile.strategy.name!r} reads tensor values ({err.func}) while running on fake "
            "tensors; its code must skip value-dependent work when StrategyContext.fake is set"
        ) from None
    by_category = {c: int(tracker.peak_by_category.get(c, 0)) for c in CATEGORIES}
    return VerifyResult(int(tracker.peak), by_category, tracker.peak_at, time.perf_counter() - started,
                        steps, n_micro, tracker.notes)


def _run(profile: Profile, strategy, config, dtype, ctx, tracker, steps: int, n_micro: int) -> None:
    """The training loop's calls, once the model exists: forward, backward, set_lr, step."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowmem_tune.loss import chunkable, decoder_hidden, head_loss
    from lowmem_tune.modeling import enable_activation_checkpointing
    from lowmem_tune.strategies import trainable_parameters

    t = profile.train
    with tracker.phase("weights", "build"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=profile.model.attn_implementation
        )
        model = strategy.prepare_model(model, ctx)
    if profile.strategy.name == "welore":
        # the estimate is of a model already compressed (`lowmem-tune compress`), which a run loads
        # without the dense weights; the dense build here (a compress-at-start run's peak) is noted
        build_peak = tracker.restart_peak()
        tracker.notes.append(f"welore: the dense model before compression peaked at {build_peak} bytes; "
                             "measured from the compressed model on")
    elif strategy.loads_on_cpu:
        # a run loads the 16-bit checkpoint on the CPU and quantizes a layer at a time on its way to
        # the device (INT8 weights, QLoRA's NF4); here the whole model was built in 16 bits first,
        # which no device ever holds
        tracker.restart_peak()
        tracker.notes.append("quantized weights: measured from the quantized model on (a run quantizes while loading)")
    if t.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    with tracker.phase("optimizer", "build_updater"):
        updater = strategy.build_updater(model, ctx)
    ids = torch.randint(0, config.vocab_size, (t.micro_batch_size, profile.data.max_seq_len))
    # every position but each row's last is a target: the planner's bound (loss.target_positions)
    positions = torch.arange(ids.numel()).view(ids.shape)[:, :-1].reshape(-1)
    for step in range(steps):
        strategy.on_step_start(step, model, updater)
        for micro in range(n_micro):
            label = f"step {step + 1} micro-batch {micro + 1}"
            batch = {"input_ids": ids, "labels": ids}
            with tracker.phase("activations", f"{label} forward"):
                hidden = decoder_hidden(model, batch) if chunkable(model) else None
            with tracker.phase("logits", f"{label} loss"):
                loss = head_loss(model, hidden, ids, positions=positions) if hidden is not None else model(**batch).loss
                del hidden
            with tracker.phase("overhead", f"{label} backward"):
                loss.backward()
            del loss
            for p in trainable_parameters(model):
                if p.grad is not None:
                    tracker.reclassify(p.grad, "gradients")
        with tracker.phase("optimizer", f"step {step + 1} optimizer step"):
            updater.set_lr(t.lr)
            updater.step()
    updater.close()


def layer_activation_profile(config: Any) -> dict[str, int]:
    """Bytes per token one decoder layer keeps for its backward, measured on fake tensors: a
    decoder of two layers minus one of one layer, run forward on one sequence of 256 and one of
    512 tokens. Keys "trained_D" (its weights train), "frozen_D" (frozen, a gradient passing
    through to layers below: LISA, OwLore) and "norms_D" (only its norms train: WeLore's layers,
    before their low-rank factors) for D = 2 (16-bit) and 4 (float32) bytes per value, at a
    sequence of no length; "per_position_D" is what each position of the sequence adds per token
    (the attention mask each layer keeps, a sequence x sequence tensor per row). Whatever the
    family keeps (Gemma's four float32 norms, Qwen3's and Gemma's q/k norms) is in the measurement."""
    import copy

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    def per_token(dtype: torch.dtype, mode: str, tokens: int) -> int:
        kept = []
        for layers in (1, 2):
            small = copy.deepcopy(config)
            small.num_hidden_layers = layers
            if getattr(small, "layer_types", None):
                small.layer_types = small.layer_types[:layers]
            tracker = _memory_tracker_class()()
            with FakeTensorMode(allow_non_fake_inputs=True), tracker:
                model = AutoModelForCausalLM.from_config(small, dtype=dtype, attn_implementation="sdpa")
                model.get_input_embeddings().weight.requires_grad_(False)
                model.enable_input_require_grads()  # the gradient reaches the layer's input either way
                for p in model.get_decoder().layers.parameters():
                    p.requires_grad_(mode == "trained" or (mode == "norms" and p.ndim == 1))
                before = tracker.total
                hidden = model.get_decoder()(input_ids=torch.zeros((1, tokens), dtype=torch.long),
                                             use_cache=False).last_hidden_state
                kept.append(tracker.total - before)
                del hidden
        return (kept[1] - kept[0]) // tokens

    profile: dict[str, int] = {}
    for dtype in (torch.bfloat16, torch.float32):
        d = torch.finfo(dtype).bits // 8
        for mode in ("trained", "frozen", "norms"):
            short, long = per_token(dtype, mode, 256), per_token(dtype, mode, 512)
            profile[f"per_position_{d}"] = (long - short) // 256
            profile[f"{mode}_{d}"] = short - profile[f"per_position_{d}"] * 256
    return profile
