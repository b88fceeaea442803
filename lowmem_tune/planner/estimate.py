"""The analytic memory model: bytes per component at the peak of a training run, per strategy.

A run's memory peaks in one of a few moments, and each is a sum of what is alive then:
- a later micro-batch's backward: weights + optimizer state + what the strategy keeps between
  micro-batches (gradients, or GaLore's low-rank accumulators) + activations + logits;
- the same at a step where GaLore matrices take a basis (every matrix at step 0, the layers
  LISA / OwLore sample anew): their sketches (rule `sketch`) or full gradients (`exact`,
  `randomized`) are alive instead of their accumulators and projectors. With one micro-batch per
  step a sketch is turned into a basis inside its own hook, so only one is ever alive;
- the optimizer step: weights + state + kept gradients + the step's temporaries.
APOLLO keeps no accumulators: its update needs each matrix's whole gradient, kept until the step
(or, layerwise, until the hook at the step's last micro-batch, where one matrix at a time is updated).
The estimate is the largest of these, with its components. What each piece costs is in
`components.py`. CUDA's own cost (context, workspace, allocator slack) is not here: see
hardware.reserve_bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowmem_tune.planner.adapters import adapter_memory
from lowmem_tune.planner.architecture import Architecture, LinearShape
from lowmem_tune.planner.components import (
    AVERAGE_BUCKET_BYTES,
    ROUNDING_BLOCK,
    Workload,
    activation_bytes,
    adam_state_bytes,
    galore_matrix,
    layer_backward_extra_bytes,
    logits_bytes,
    rounding_bytes,
    sketch_bytes,
    sketch_finish_bytes,
)
from lowmem_tune.planner.welore_ranks import assumed_lrcs, welore_layer_extra
from lowmem_tune.profile import ADAPTERS, APOLLO, INT8_CAPABLE, StrategySection, strategy_knobs

COMPONENTS = ("weights", "gradients", "optimizer", "projectors", "activations", "logits", "overhead")
PLANNER_KNOBS = ("rank", "sampled_layers", "optimizer", "bits", "layerwise", "rank_reduction", "svd", "rounding",
                 "update_proj_gap", "weight_bits", "group_size", "train_embeddings", "embedding_rank", "lora_rank",
                 "lora_dropout", "target_modules")
"""The StrategySection knobs the planner searches or reads; the estimate ignores the others."""


def planner_settings(strategy: StrategySection) -> dict[str, Any]:
    """The planner's knobs that the strategy reads, by name."""
    reads = strategy_knobs(strategy.name)
    return {k: getattr(strategy, k) for k in PLANNER_KNOBS if k in reads}


@dataclass
class Estimate:
    strategy: str
    settings: dict[str, Any]
    memory: dict[str, int]
    phase: str
    """Which moment the peak is: 'backward', 'basis step backward', 'backward start',
    'backward end' or 'optimizer step'."""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.memory["total"]


@dataclass
class _Parts:
    """Bytes by what holds them, for one strategy, before choosing the peak moment."""

    weights: int = 0
    dense_grads: int = 0  # full gradients kept across micro-batches (and into the step)
    accumulators: int = 0  # GaLore low-rank fp32 accumulators (layerwise), kept across micro-batches
    optimizer: int = 0
    projectors: int = 0
    step_temp: int = 0  # the optimizer step's largest temporaries
    basis_held: int = 0  # at a basis step, across micro-batches: sketches or full gradients instead of
    # the accumulators and projectors (every GaLore matrix of a strategy takes its basis at one step)
    basis_transient: int = 0  # a sketch made and turned into a basis within one hook
    layer_transient: int = 0  # an INT8 layer's weight, dequantized inside its forward and backward
    hook_transient: int = 0  # layerwise APOLLO: one matrix's gradient and its update's temporaries, in backward
    trained_from_layer: int = 0
    frozen_layers: int = 0  # layers gradients pass through without training them (lisa, owlore)
    frozen_norms_train: bool = False  # ... whose norms train all the same (welore's train_norms, on by default)
    extra_activation_bytes: int = 0  # what WeLore's factors or adapters keep on top of frozen layers
    extra_layer_bytes: int = 0  # ... of them, what one layer's adapters keep (recomputed with checkpointing)
    notes: list[str] = field(default_factory=list)


def _dense_optimizer(numel_list: list[int], kind: str, d: int) -> int:
    return sum(adam_state_bytes(n, kind, d) for n in numel_list)


def _non_layer_tensors(arch: Architecture) -> list[int]:
    sizes = [arch.embedding_params, arch.final_norm_params]
    if arch.lm_head_params:
        sizes.append(arch.lm_head_params)
    return sizes


def _layer_small_tensors(arch: Architecture) -> list[int]:
    """Per decoder layer: the norm weights (and biases) that are not GaLore matrices."""
    small = [arch.hidden_size, arch.hidden_size]
    small += [lin.out_features for lin in arch.linears if lin.bias]
    return small


def _svd_bytes(lin: LinearShape) -> int:
    """An exact SVD's float32 copy of the gradient and its factors U, S, Vᵀ."""
    m, n = lin.out_features, lin.in_features
    return 4 * (m * n + min(m, n) * (m + n + 1))


Matrices = list[tuple[LinearShape, int, int]]
"""GaLore matrices as (shape, how many, rank)."""


def _galore(parts: _Parts, matrices: Matrices, dense: list[int], s: StrategySection, w: Workload,
            variant: str = "galore") -> _Parts:
    """GaLore-AdamW over `matrices` and AdamW over the `dense` tensors; all of the matrices take a
    basis at the same step (step 0, or a new layer sample)."""
    d, k = w.dtype_bytes, w.gradient_accumulation
    kind = "8bit" if s.bits == 8 else "fp32"
    parts.dense_grads += sum(dense) * d
    parts.optimizer += _dense_optimizer(dense, kind, d)
    per = [(lin, n, r, galore_matrix(lin, r, d, s.bits)) for lin, n, r in matrices]
    parts.projectors += sum(n * x[0] for _, n, _, x in per)
    parts.optimizer += sum(n * x[1] for _, n, _, x in per)
    full = sum(n * lin.out_features * lin.in_features * d for lin, n, _, _ in per)
    biggest = max((lin for lin, _, _ in matrices), key=lambda lin: lin.out_features * lin.in_features)
    if variant in APOLLO:
        return _apollo(parts, matrices, full, biggest, s, w)
    parts.step_temp = max(parts.step_temp, max(x[3] for *_, x in per))
    rule = "exact" if variant == "fira" and s.svd == "sketch" else s.svd
    if variant == "fira" or not s.layerwise:
        parts.dense_grads += full  # kept until the step (Fira needs them for its residual)
    else:
        parts.accumulators += sum(n * x[2] for _, n, _, x in per)
    if variant == "fira":  # residual G - P Pᵀ G and its scaled copy, fp32, at full size
        parts.step_temp += 2 * 4 * biggest.out_features * biggest.in_features
    if rule == "sketch":
        finish = max(sketch_bytes(lin, r) + sketch_finish_bytes(lin, r) for lin, _, r in matrices)
        if k > 1 or w.gpus > 1:  # sketches that outlive their hook get the room accumulators will take (SketchRoom)
            sketches = sum(n * sketch_bytes(lin, r) for lin, n, r in matrices)
            room = sum(n * (x[0] + x[2]) for _, n, _, x in per) + max(sketch_bytes(lin, r) for lin, _, r in matrices)
            parts.basis_held = min(sketches, room)
        parts.basis_transient = finish
        parts.step_temp = max(parts.step_temp, finish)
        return _averaging(parts, w)
    # the SVD of one matrix's gradient, at the step (or in the hook, for the first micro-batch rule)
    parts.step_temp = max(parts.step_temp, _svd_bytes(biggest))
    if s.layerwise and variant != "fira":
        count = sum(n for _, n, _ in matrices)
        refreshing = -(-count // s.update_proj_gap)  # staggered: about n / T matrices a step
        parts.dense_grads += refreshing * biggest.out_features * biggest.in_features * d
        if rule != "first_micro_batch":
            parts.basis_held = full
    return _averaging(parts, w)


def _apollo(parts: _Parts, matrices: Matrices, full: int, biggest: LinearShape, s: StrategySection,
            w: Workload) -> _Parts:
    """APOLLO's matrices (projection and moments counted by `_galore`): their gradients are kept
    until the update — every one across the micro-batches of a step, and at a non-layerwise step;
    layerwise with one micro-batch only the one in its hook. An update holds the float32 low-rank
    gradient and direction, and a block of rows of s ⊙ G (float32) with the block's value it is
    written into (an INT8 block: its old value, value, update, and the noise and sum of stochastic
    rounding onto the codes; measured on fake tensors)."""
    d = w.dtype_bytes
    m, n = biggest.out_features, biggest.in_features
    low = max(min(r, lin.out_features, lin.in_features) * max(lin.out_features, lin.in_features)
              for lin, _, r in matrices)
    block = min(m * n, ROUNDING_BLOCK)
    temp = 8 * low + (20 if s.weight_bits == 8 else 8) * block
    if s.layerwise:  # in backward, inside a layer's working set (estimate)
        # the gradient in flight (with one micro-batch a step), and with several GPUs its flat copy
        # for the all-reduce (train/distributed.py), made in the hook
        parts.hook_transient = temp + m * n * d * ((w.gradient_accumulation == 1) + (w.gpus > 1))
    else:
        parts.step_temp = max(parts.step_temp, temp)
    if not s.layerwise or w.gradient_accumulation > 1:
        parts.dense_grads += full
    return _averaging(parts, w)


def _adamw(parts: _Parts, trained: list[int], optimizer: str, s: StrategySection, w: Workload) -> _Parts:
    """AdamW (`adamw`: fp32 moments, or the weights' dtype for torch's own; `adamw8bit`) over the
    `trained` tensors (optim/build.py)."""
    d = w.dtype_bytes
    parts.dense_grads = sum(trained) * d
    largest = max(trained)
    if s.rounding == "stochastic" and d < 4:  # ours, writing in row blocks with stochastic rounding
        if optimizer == "adamw8bit":
            parts.optimizer = _dense_optimizer(trained, "8bit", d)
            parts.step_temp = max(parts.step_temp, rounding_bytes(largest, d))
        else:
            parts.optimizer = _dense_optimizer(trained, "fp32", d)
            # moments and direction a row block at a time: besides the rounding's block (whose
            # update is the direction), the block's float32 gradient and sqrt(v)
            parts.step_temp = max(parts.step_temp, rounding_bytes(largest, d) + 8 * min(largest, ROUNDING_BLOCK))
        return _averaging(parts, w)
    parts.optimizer = _dense_optimizer(trained, "plain" if optimizer == "adamw" else "8bit", d)
    # torch AdamW (single-tensor path) makes sqrt(v) and its quotient at the largest tensor;
    # bitsandbytes updates in place
    parts.step_temp = 2 * largest * d if optimizer == "adamw" else 0
    return parts


def _averaging(parts: _Parts, w: Workload) -> _Parts:
    """Several GPUs: GaLore averages its state in buckets (train/distributed.py), one flat copy of
    up to 64 MiB at the step; torch / bitsandbytes optimizers run under DDP with its buckets as
    the gradients (gradient_as_bucket_view), which costs nothing more."""
    if w.gpus > 1:
        held = parts.dense_grads + parts.accumulators + parts.basis_held
        parts.step_temp += min(held, AVERAGE_BUCKET_BYTES)
    return parts


def _head_and_embeddings(arch: Architecture, s: StrategySection) -> tuple[list[int], Matrices]:
    """(dense tensors, GaLore matrices) of the embeddings, final norm and lm_head: trained
    full-rank, through GaLore at embedding_rank, or frozen (nothing)."""
    if not _embeddings_train(s):
        return [], []
    tables = [LinearShape("embed_tokens", arch.vocab_size, arch.hidden_size, False)]
    if arch.lm_head_params:
        tables.append(LinearShape("lm_head", arch.vocab_size, arch.hidden_size, False))
    if s.embedding_rank is not None and "embedding_rank" in strategy_knobs(s.name):
        return [arch.final_norm_params], [(t, 1, s.embedding_rank) for t in tables]
    return _non_layer_tensors(arch), []


def _embeddings_train(s: StrategySection) -> bool:
    if s.name in ADAPTERS:
        return False
    return s.train_embeddings is not False and not (s.name == "welore" and s.train_embeddings is None)


def _parts(s: StrategySection, arch: Architecture, w: Workload) -> _Parts:
    strategy, d = s.name, w.dtype_bytes
    parts = _Parts(weights=arch.params * d)
    if s.weight_bits == 8 and strategy in INT8_CAPABLE and strategy != "welore":  # WeLore's: _welore_parts
        _int8_weights(parts, arch, [(lin.out_features, lin.in_features, arch.num_layers) for lin in arch.linears],
                      s, d)
    layer_tensors = [lin.out_features * lin.in_features for lin in arch.linears] + _layer_small_tensors(arch)
    all_tensors = _non_layer_tensors(arch) + layer_tensors * arch.num_layers
    largest = max(all_tensors)
    heads, head_matrices = _head_and_embeddings(arch, s)
    if strategy in ("full", "adamw8bit"):
        return _adamw(parts, heads + layer_tensors * arch.num_layers, "adamw" if strategy == "full" else "adamw8bit",
                      s, w)
    if s.rounding == "stochastic":
        parts.step_temp = rounding_bytes(largest, d)
    if strategy in ("galore", "fira") + APOLLO:
        dense = heads + _layer_small_tensors(arch) * arch.num_layers
        decoder = [(lin, arch.num_layers, s.rank) for lin in arch.linears]
        return _galore(parts, decoder + head_matrices, dense, s, w, strategy)
    if strategy in ("lisa", "owlore"):
        return _layer_sampling_parts(arch, s, w, parts)
    if strategy == "welore":
        return _welore_parts(arch, s, w, parts)
    if strategy in ADAPTERS:
        return _adapter_parts(arch, s, w, parts)
    raise ValueError(f"no estimate for strategy {strategy!r}")


def _int8_weights(parts: _Parts, arch: Architecture, matrices: list[tuple[int, int, int]], s: StrategySection,
                  d: int) -> None:
    """Weights when the decoder `matrices` (out, in, how many) are int8 codes with a float32 scale
    per group of `group_size` inputs (the last group of a row may be shorter), the rest 16-bit; a
    layer's largest matrix is dequantized inside its forward and backward."""
    stored = sum(n * o * i for o, i, n in matrices)
    scales = sum(n * o * -(-i // s.group_size) for o, i, n in matrices)
    dense = arch.params - sum(lin.out_features * lin.in_features for lin in arch.linears) * arch.num_layers
    parts.weights = dense * d + stored + 4 * scales
    parts.layer_transient = d * max(o * i for o, i, _ in matrices)
    parts.notes.append(f"INT8 decoder weights, a scale per {s.group_size} inputs")


def _layer_sampling_parts(arch: Architecture, s: StrategySection, w: Workload, parts: _Parts) -> _Parts:
    """γ sampled layers train (GaLore inside them by default), embeddings, final norm and head
    always; the state of layers leaving the sample is released (strategies/layer_sampling.py)."""
    gamma = min(s.sampled_layers, arch.num_layers)
    parts.frozen_layers = arch.num_layers - gamma
    always, head_matrices = _head_and_embeddings(arch, s)
    small = _layer_small_tensors(arch) * gamma
    if s.optimizer in ("galore",) + APOLLO:
        return _galore(parts, [(lin, gamma, s.rank) for lin in arch.linears] + head_matrices, always + small, s, w,
                       s.optimizer)
    always = always + [m.out_features * m.in_features for m, _, _ in head_matrices]  # no GaLore: full rank
    matrices = [lin.out_features * lin.in_features for lin in arch.linears] * gamma
    return _adamw(parts, always + small + matrices, s.optimizer, s, w)


def _welore_parts(arch: Architecture, s: StrategySection, w: Workload, parts: _Parts) -> _Parts:
    """A model already compressed with `lowmem-tune compress` (model.name pointing at it) at the
    ranks `assumed_ranks` expects: LRC factors and norms train, embeddings, lm_head and N-LRC
    matrices are frozen. (Compressing at run start peaks earlier, with the dense model loaded.)"""
    d = w.dtype_bytes
    lrcs = assumed_lrcs(arch, s.rank_reduction)
    removed = sum(x.layers * (x.linear.out_features * x.linear.in_features
                              - x.rank * (x.linear.out_features + x.linear.in_features)) for x in lrcs)
    parts.weights = (arch.params - removed) * d
    if s.weight_bits == 8:  # the LRC factors and the dense N-LRC matrices alike
        lrc = {x.linear.name: x for x in lrcs}
        stored = []
        for lin in arch.linears:
            x = lrc.get(lin.name)
            if x is not None:
                stored += [(lin.out_features, x.rank, x.layers), (x.rank, lin.in_features, x.layers)]
            if arch.num_layers - (x.layers if x else 0):
                stored.append((lin.out_features, lin.in_features, arch.num_layers - (x.layers if x else 0)))
        _int8_weights(parts, arch, stored, s, d)
    norms = [arch.hidden_size] * (2 * arch.num_layers) + [arch.final_norm_params]
    factors = [(LinearShape(x.linear.name, x.linear.out_features, x.rank, False), x.layers, s.rank) for x in lrcs]
    factors += [(LinearShape(x.linear.name, x.rank, x.linear.in_features, False), x.layers, s.rank) for x in lrcs]
    heads, _ = _head_and_embeddings(arch, s)
    norms = norms + [t for t in heads if t != arch.final_norm_params]
    parts.extra_activation_bytes = welore_layer_extra(arch, lrcs, w)
    parts.frozen_layers = arch.num_layers
    parts.frozen_norms_train = True
    trainable = sum(n * (f.out_features * f.in_features) for f, n, _ in factors) + sum(norms)
    parts.notes.append(f"gives up {s.rank_reduction:.0%} of the decoder's rank; trains {trainable:,} of "
                       f"{arch.params - removed:,} parameters ({trainable / (arch.params - removed):.1%})")
    parts.notes.append(f"models a model already compressed (ERR {s.rank_reduction}): "
                       + ", ".join(f"{x.linear.name} rank {x.rank} x{x.layers}" for x in lrcs))
    if s.optimizer == "galore":
        return _galore(parts, factors, norms, s, w)
    factor_sizes = [f.out_features * f.in_features for f, n, _ in factors for _ in range(n)]
    return _adamw(parts, norms + factor_sizes, s.optimizer, s, w)


def _adapter_parts(arch: Architecture, s: StrategySection, w: Workload, parts: _Parts) -> _Parts:
    """LoRA / DoRA / QLoRA: the pieces `adapters.adapter_memory` counts, held as AdamW's are."""
    a = adapter_memory(arch, s, w, parts.weights)
    parts.weights = a.weights
    parts.dense_grads, parts.optimizer = 4 * a.parameters, 8 * a.parameters  # float32, torch AdamW
    parts.step_temp = 2 * 4 * a.largest  # torch AdamW's single-tensor path, as on fake tensors
    parts.layer_transient = a.layer_transient
    parts.frozen_layers = arch.num_layers
    parts.extra_layer_bytes = a.layer_extra
    parts.extra_activation_bytes = a.layer_extra * arch.num_layers
    parts.notes += a.notes
    return parts


def estimate(strategy: StrategySection, arch: Architecture, workload: Workload) -> Estimate:
    """The peak bytes of training `arch` with `strategy` (its name and knobs), by component (see
    module docstring)."""
    p = _parts(strategy, arch, workload)
    kept_acts, working = activation_bytes(arch, workload, p.trained_from_layer, p.frozen_layers,
                                          p.frozen_norms_train)
    if workload.gradient_checkpointing:
        working += p.extra_layer_bytes
    else:
        kept_acts += p.extra_activation_bytes
    logits = logits_bytes(arch, workload, head_trained=_embeddings_train(strategy))
    # the logits' backward finishes before any layer's backward (or recompute) starts
    # APOLLO's hooks run between a layer's gradient products, whose temporaries are gone by then
    # (measured on fake tensors): the larger of the two counts
    working += p.layer_transient + max(p.hook_transient - layer_backward_extra_bytes(arch, workload), 0)
    act_overhead = max(working - logits, 0)
    held = p.dense_grads + p.accumulators
    state = {"optimizer": p.optimizer, "projectors": p.projectors}
    moments: list[tuple[str, dict[str, int]]] = [
        ("optimizer step", {"gradients": held, **state, "activations": 0, "logits": 0, "overhead": p.step_temp}),
    ]
    if workload.gradient_accumulation > 1:
        # a later micro-batch runs with the gradients (or accumulators) of the earlier ones
        moments.append(("backward", {"gradients": held, **state, "activations": kept_acts, "logits": logits,
                                     "overhead": act_overhead}))
        if p.basis_held:
            moments.append(("basis step backward", {
                "gradients": p.dense_grads + p.basis_held, "optimizer": p.optimizer, "projectors": 0,
                "activations": kept_acts, "logits": logits, "overhead": act_overhead}))
    else:
        # one micro-batch per step: the first layer's backward (its recompute and gradients) runs
        # while every checkpoint is still kept and no gradient is held yet
        moments.append(("backward start", {"gradients": 0, **state, "activations": kept_acts, "logits": logits,
                                           "overhead": act_overhead}))
        moments.append(("backward end", {"gradients": held, **state, "activations": 0, "logits": 0,
                                         "overhead": max(working, p.basis_transient)}))
    phase, parts = max(moments, key=lambda item: sum(item[1].values()))
    memory = {"weights": p.weights, **parts}
    memory = {k: int(memory[k]) for k in COMPONENTS}
    memory["total"] = sum(memory.values())
    return Estimate(strategy.name, planner_settings(strategy), memory, phase, p.notes)


def estimate_profile(profile: Any, dtype_bytes: int, gpus: int = 1) -> Estimate:
    """The estimate for what a run profile will do (its model, strategy knobs and workload)."""
    from lowmem_tune.planner.architecture import resolve_architecture

    t = profile.train
    workload = Workload(profile.data.max_seq_len, t.micro_batch_size, t.activation_checkpointing, dtype_bytes,
                        t.gradient_accumulation, gpus)
    return estimate(profile.strategy, resolve_architecture(profile.model.name), workload)
