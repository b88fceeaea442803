"""The analytic memory model: bytes per component at the peak of a training run, per strategy.

A run's memory peaks in one of a few moments, and each is a sum of what is alive then:
- a later micro-batch's backward: weights + optimizer state + what the strategy keeps between
  micro-batches (gradients, or GaLore's low-rank accumulators) + activations + logits;
- the optimizer step: weights + state + kept gradients + the step's temporaries;
- no first-step moment for GaLore inside any strategy: a matrix without a basis (step 0, or a
  layer LISA / OwLore samples anew) takes it from its first micro-batch gradient in the backward
  hook and frees that gradient as at any other step (see optim/galore_adamw.py).
The estimate is the largest of these, with its components. The constants below were measured on
fake tensors (`plan --verify`, `benchmarks/planner_accuracy.py`), not taken from papers: per token
and decoder layer, HF Llama with SDPA keeps the fp32 copy of each RMSNorm input (4h), the norm's
two 16-bit outputs (2·2h), gate, up, SiLU and product (4·I), q and the attention output (2·q_dim),
k and v (2·kv_dim) and the fp32 log-sum-exp (4·heads); with activation checkpointing only each
layer's input (h) stays, plus one layer's working set while it is recomputed.

CUDA's own cost (context, workspace, allocator slack) is not here: see hardware.reserve_bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lowmem_tune.planner.architecture import Architecture, LinearShape
from lowmem_tune.planner.welore_ranks import AssumedLrc, assumed_lrcs

COMPONENTS = ("weights", "gradients", "optimizer", "projectors", "activations", "logits", "overhead")
BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizer block: one fp32 absmax per 256 values
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 moments in bitsandbytes and GaLoreAdamW


@dataclass(frozen=True)
class Workload:
    seq_len: int
    micro_batch_size: int
    gradient_checkpointing: bool
    dtype_bytes: int = 2  # bf16
    gradient_accumulation: int = 2

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch_size

    @property
    def dtype(self) -> str:
        return {2: "bfloat16", 4: "float32"}[self.dtype_bytes]


@dataclass(frozen=True)
class Settings:
    """The strategy knobs the planner searches (the rest keep their profile defaults)."""

    rank: int = 128
    sampled_layers: int = 2
    optimizer: str = "galore"  # inside sampled layers (lisa, owlore) / for WeLore factors
    bits: int = 8
    layerwise: bool = True
    rank_reduction: float = 0.5

    def for_strategy(self, strategy: str) -> dict[str, Any]:
        """Only the knobs that strategy reads."""
        keys = {
            "full": (), "adamw8bit": (),
            "galore": ("rank", "bits", "layerwise"), "fira": ("rank", "bits", "layerwise"),
            "lisa": ("sampled_layers", "optimizer", "rank", "bits"),
            "owlore": ("sampled_layers", "optimizer", "rank", "bits"),
            "welore": ("rank_reduction", "optimizer", "rank", "bits"),
        }[strategy]
        return {k: v for k, v in asdict(self).items() if k in keys}


@dataclass
class Estimate:
    strategy: str
    settings: dict[str, Any]
    memory: dict[str, int]
    phase: str
    """Which moment the peak is: 'backward', 'backward start', 'backward end' or 'optimizer step'."""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.memory["total"]


# --------------------------------------------------------------------------- building blocks


def adam_state_bytes(numel: int, kind: str, dtype_bytes: int) -> int:
    """Two Adam moments of a tensor: 'plain' in the weights' dtype (torch AdamW), 'fp32'
    (GaLoreAdamW's 32-bit path), '8bit' (bitsandbytes blockwise: uint8 + fp32 absmax per block;
    tensors under 4096 values stay fp32)."""
    if kind == "plain":
        return 2 * numel * dtype_bytes
    if kind == "fp32" or numel < MIN_8BIT_SIZE:
        return 2 * numel * 4
    return 2 * (numel + 4 * -(-numel // BLOCKSIZE))


def layer_activation_bytes(arch: Architecture, w: Workload) -> int:
    """Bytes one decoder layer keeps for backward without checkpointing (see module docstring)."""
    h, d = arch.hidden_size, w.dtype_bytes
    per_token = (2 * (4 * h + 2 * d * h) + 4 * d * arch.intermediate_size
                 + 2 * d * arch.q_dim + 2 * d * arch.kv_dim + 4 * arch.num_heads + 8)
    return w.tokens * per_token


def frozen_layer_activation_bytes(arch: Architecture, w: Workload) -> int:
    """A frozen decoder layer that gradients still pass through (LISA / OwLore) keeps less: no
    linear saves its input for a weight gradient, so the two norm outputs, the attention output's
    copy for o_proj and the MLP product are not kept (measured: 4·d·h + d·I per token fewer)."""
    d = w.dtype_bytes
    return layer_activation_bytes(arch, w) - w.tokens * d * (4 * arch.hidden_size + arch.intermediate_size)


def layer_backward_extra_bytes(arch: Architecture, w: Workload) -> int:
    """Gradient temporaries alive at once inside one layer's backward (MLP: two I-sized)."""
    return w.tokens * (2 * w.dtype_bytes * arch.intermediate_size + 4 * arch.hidden_size)


def logits_bytes(arch: Architecture, w: Workload) -> int:
    """16-bit logits, their fp32 upcast and log-softmax (forward) and the fp32 gradient being
    formed at the start of backward: ~(d + 12)·V per token."""
    return w.tokens * arch.vocab_size * (w.dtype_bytes + 12)


def activation_bytes(arch: Architecture, w: Workload, trained_from_layer: int = 0,
                     frozen_layers: int = 0) -> tuple[int, int]:
    """(kept activations, transient working set) at the backward peak.

    Layers below the first trainable one (with frozen embeddings) keep nothing; `frozen_layers`
    of the others keep a frozen layer's smaller set (without checkpointing)."""
    layers = arch.num_layers - trained_from_layer
    h, d = arch.hidden_size, w.dtype_bytes
    final_norm = w.tokens * d * h  # the lm_head's input (measured: the norm's fp32 copy is gone by then)
    if w.gradient_checkpointing:
        kept = layers * w.tokens * d * h + final_norm
        working = layer_activation_bytes(arch, w) + layer_backward_extra_bytes(arch, w)
        return kept, working
    kept = ((layers - frozen_layers) * layer_activation_bytes(arch, w)
            + frozen_layers * frozen_layer_activation_bytes(arch, w) + final_norm)
    return kept, layer_backward_extra_bytes(arch, w)


@dataclass
class _Parts:
    """Bytes by what holds them, for one strategy, before choosing the peak moment."""

    weights: int = 0
    dense_grads: int = 0  # full gradients kept across micro-batches (and into the step)
    accumulators: int = 0  # GaLore low-rank fp32 accumulators (layerwise), kept across micro-batches
    optimizer: int = 0
    projectors: int = 0
    step_temp: int = 0  # the optimizer step's largest temporaries
    trained_from_layer: int = 0
    frozen_layers: int = 0  # layers gradients pass through without training them (lisa, owlore)
    lrc_activation_bytes: int = 0  # what WeLore's factors keep on top of frozen layers
    notes: list[str] = field(default_factory=list)


def _galore_matrix(lin: LinearShape, rank: int, d: int, bits: int) -> tuple[int, int, int, int]:
    """(projector, moments, accumulator, step temporaries) bytes of one GaLore matrix ('std')."""
    m, n = lin.out_features, lin.in_features
    r = min(rank, m, n)
    low = r * max(m, n)
    moments = adam_state_bytes(low, "8bit" if bits == 8 else "fp32", d)
    # step: the fp32 low-rank gradient and the direction (fp32), the direction cast to the weights' dtype
    temp = low * (4 + 4 + d)
    return r * min(m, n) * d, moments, 4 * low, temp


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


def _parts(strategy: str, arch: Architecture, s: Settings, w: Workload) -> _Parts:
    d = w.dtype_bytes
    parts = _Parts(weights=arch.params * d)
    layer_tensors = [lin.out_features * lin.in_features for lin in arch.linears] + _layer_small_tensors(arch)
    all_tensors = _non_layer_tensors(arch) + layer_tensors * arch.num_layers
    largest = max(all_tensors)
    if strategy in ("full", "adamw8bit"):
        kind = "plain" if strategy == "full" else "8bit"
        parts.dense_grads = arch.params * d
        parts.optimizer = _dense_optimizer(all_tensors, kind, d)
        # torch AdamW (single-tensor path) makes sqrt(v) and its quotient at the largest tensor;
        # bitsandbytes updates in place
        parts.step_temp = 2 * largest * d if kind == "plain" else 0
        return parts
    if strategy in ("galore", "fira"):
        dense = _non_layer_tensors(arch) + _layer_small_tensors(arch) * arch.num_layers
        parts.dense_grads = sum(dense) * d
        parts.optimizer = _dense_optimizer(dense, "8bit" if s.bits == 8 else "fp32", d)
        per_layer = [_galore_matrix(lin, s.rank, d, s.bits) for lin in arch.linears]
        parts.projectors = arch.num_layers * sum(x[0] for x in per_layer)
        parts.optimizer += arch.num_layers * sum(x[1] for x in per_layer)
        galore_grads = arch.num_layers * sum(lin.out_features * lin.in_features for lin in arch.linears) * d
        if strategy == "fira" or not s.layerwise:
            parts.dense_grads += galore_grads  # Fira needs the full gradient at the step
        else:
            parts.accumulators = arch.num_layers * sum(x[2] for x in per_layer)
        biggest = max(arch.linears, key=lambda lin: lin.out_features * lin.in_features)
        parts.step_temp = max(x[3] for x in per_layer)
        if strategy == "fira":  # residual G - P Pᵀ G and its scaled copy, fp32, at full size
            parts.step_temp += 2 * 4 * biggest.out_features * biggest.in_features
        # no first-step peak: a matrix takes its first basis from its first micro-batch gradient in
        # the backward hook and frees it like at any other step (optim/galore_adamw.py)
        return parts
    if strategy in ("lisa", "owlore"):
        return _layer_sampling_parts(arch, s, w, parts)
    if strategy == "welore":
        return _welore_parts(arch, s, w, parts)
    raise ValueError(f"no estimate for strategy {strategy!r}")


def _layer_sampling_parts(arch: Architecture, s: Settings, w: Workload, parts: _Parts) -> _Parts:
    """γ sampled layers train (GaLore inside them by default), embeddings, final norm and head
    always; the state of layers leaving the sample is released (strategies/layer_sampling.py)."""
    d = w.dtype_bytes
    gamma = min(s.sampled_layers, arch.num_layers)
    parts.frozen_layers = arch.num_layers - gamma
    always = _non_layer_tensors(arch)
    small = _layer_small_tensors(arch) * gamma
    matrices = [lin.out_features * lin.in_features for lin in arch.linears] * gamma
    if s.optimizer == "galore":
        kind = "8bit" if s.bits == 8 else "fp32"
        parts.dense_grads = sum(always + small) * d
        parts.optimizer = _dense_optimizer(always + small, kind, d)
        per_layer = [_galore_matrix(lin, s.rank, d, s.bits) for lin in arch.linears]
        parts.projectors = gamma * sum(x[0] for x in per_layer)
        parts.optimizer += gamma * sum(x[1] for x in per_layer)
        parts.accumulators = gamma * sum(x[2] for x in per_layer)
        parts.step_temp = max(x[3] for x in per_layer)
        return parts
    kind = "plain" if s.optimizer == "adamw" else "8bit"
    trained = always + small + matrices
    parts.dense_grads = sum(trained) * d
    parts.optimizer = _dense_optimizer(trained, kind, d)
    parts.step_temp = 2 * max(trained) * d if kind == "plain" else 0
    return parts


def _welore_parts(arch: Architecture, s: Settings, w: Workload, parts: _Parts) -> _Parts:
    """A model already compressed with `lowmem-tune compress` (model.name pointing at it) at the
    ranks `assumed_ranks` expects: LRC factors and norms train, embeddings, lm_head and N-LRC
    matrices are frozen. (Compressing at run start peaks earlier, with the dense model loaded.)"""
    d = w.dtype_bytes
    lrcs = assumed_lrcs(arch, s.rank_reduction)
    removed = sum(x.layers * (x.linear.out_features * x.linear.in_features
                              - x.rank * (x.linear.out_features + x.linear.in_features)) for x in lrcs)
    parts.weights = (arch.params - removed) * d
    norms = [arch.hidden_size] * (2 * arch.num_layers) + [arch.final_norm_params]
    factors = [(LinearShape(x.linear.name, x.linear.out_features, x.rank, False),
                LinearShape(x.linear.name, x.rank, x.linear.in_features, False), x.layers) for x in lrcs]
    factor_sizes = [f.out_features * f.in_features for left, right, n in factors for f in (left, right)
                    for _ in range(n)]
    parts.lrc_activation_bytes = _welore_layer_extra(arch, lrcs, w)
    parts.frozen_layers = arch.num_layers
    parts.notes.append(f"models a model already compressed (ERR {s.rank_reduction}): "
                       + ", ".join(f"{x.linear.name} rank {x.rank} x{x.layers}" for x in lrcs))
    if s.optimizer == "galore":
        kind = "8bit" if s.bits == 8 else "fp32"
        parts.dense_grads = sum(norms) * d
        parts.optimizer = _dense_optimizer(norms, kind, d)
        per_factor = [(_galore_matrix(f, s.rank, d, s.bits), n) for left, right, n in factors for f in (left, right)]
        parts.projectors = sum(n * x[0] for x, n in per_factor)
        parts.optimizer += sum(n * x[1] for x, n in per_factor)
        parts.accumulators = sum(n * x[2] for x, n in per_factor)
        parts.step_temp = max(x[3] for x, _ in per_factor)
        return parts
    kind = "plain" if s.optimizer == "adamw" else "8bit"
    trained = norms + factor_sizes
    parts.dense_grads = sum(trained) * d
    parts.optimizer = _dense_optimizer(trained, kind, d)
    parts.step_temp = 2 * max(trained) * d if kind == "plain" else 0
    return parts


def _welore_layer_extra(arch: Architecture, lrcs: list[AssumedLrc], w: Workload) -> int:
    """Activations the LRCs add over frozen layers (all layers summed): each LRC keeps its
    rank-k intermediate for the left factor's gradient, and its input for the right factor's
    (q/k/v share the attention norm's output, gate/up the MLP norm's; measured on fake tensors:
    d·h per norm output, one more d·h when gate and up both train, as in a trained layer)."""
    d, h = w.dtype_bytes, arch.hidden_size
    inputs = {"q_proj": ("attn", h), "k_proj": ("attn", h), "v_proj": ("attn", h),
              "o_proj": ("o", arch.q_dim), "gate_proj": ("gate", h), "up_proj": ("up", h),
              "down_proj": ("down", arch.intermediate_size)}
    total = 0
    for layer in range(arch.num_layers):
        here = [x for x in lrcs if layer < x.layers]  # which layers hold them does not matter here
        groups = {inputs[x.linear.name] for x in here if x.linear.name in inputs}
        total += sum(size for _, size in groups) + sum(x.rank for x in here)
    return total * d * w.tokens


def estimate(strategy: str, arch: Architecture, settings: Settings, workload: Workload) -> Estimate:
    """The peak bytes of training `arch` with `strategy`, by component (see module docstring)."""
    p = _parts(strategy, arch, settings, workload)
    kept_acts, working = activation_bytes(arch, workload, p.trained_from_layer, p.frozen_layers)
    if not workload.gradient_checkpointing:
        kept_acts += p.lrc_activation_bytes
    logits = logits_bytes(arch, workload)
    # the logits' backward finishes before any layer's backward (or recompute) starts
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
    else:
        # one micro-batch per step: gradients appear only as activations and logits are freed
        moments.append(("backward start", {"gradients": 0, **state, "activations": kept_acts, "logits": logits,
                                           "overhead": 0}))
        moments.append(("backward end", {"gradients": held, **state, "activations": 0, "logits": 0,
                                         "overhead": working}))
    phase, parts = max(moments, key=lambda item: sum(item[1].values()))
    memory = {"weights": p.weights, **parts}
    memory = {k: int(memory[k]) for k in COMPONENTS}
    memory["total"] = sum(memory.values())
    return Estimate(strategy, settings.for_strategy(strategy), memory, phase, p.notes)


def estimate_profile(profile: Any, dtype_bytes: int) -> Estimate:
    """The estimate for what a run profile will do (its model, strategy knobs and workload)."""
    from lowmem_tune.planner.architecture import resolve_architecture

    s, t = profile.strategy, profile.train
    settings = Settings(rank=s.rank, sampled_layers=s.sampled_layers, optimizer=s.optimizer, bits=s.bits,
                        layerwise=s.layerwise, rank_reduction=s.rank_reduction)
    workload = Workload(profile.data.max_seq_len, t.micro_batch_size, t.activation_checkpointing, dtype_bytes,
                        t.gradient_accumulation)
    return estimate(s.name, resolve_architecture(profile.model.name), settings, workload)
