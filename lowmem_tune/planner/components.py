"""Bytes of the pieces a training step holds: optimizer states, activations, logits, GaLore's
projectors, accumulators and sketches, stochastic rounding's working blocks. What a decoder layer
keeps for backward is measured per architecture on fake tensors (`Architecture.activations`, from
`verify.layer_activation_profile`), not written as a formula: HF Llama with SDPA keeps the fp32
copy of each RMSNorm input, the norms' 16-bit outputs, gate, up, SiLU and product, q, k, v and the
attention output and the fp32 log-sum-exp, about 183 KiB a token in bf16 at 7B; Gemma 3 keeps more
per parameter (four float32 norms a layer and norms on q and k). With activation checkpointing only
each layer's input (h) stays, plus one layer's working set while it is recomputed. The other
constants were measured the same way (`plan --verify`, `benchmarks/planner_accuracy.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_tune.planner.architecture import Architecture, LinearShape

BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizer block: one fp32 absmax per 256 values
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 moments in bitsandbytes and GaLoreAdamW
SKETCH_OVERSAMPLE = 8  # optim/subspace.py: k = r + 8 columns, l = 2k + 1 rows
ROUNDING_BLOCK = 1 << 20  # optim/writer.py: values written per block with stochastic rounding
LOSS_CHUNK_TOKENS = 1024  # loss.py: positions whose logits exist at once
AVERAGE_BUCKET_BYTES = 64 * 2**20  # train/distributed.py: tensors averaged in one all-reduce


@dataclass(frozen=True)
class Workload:
    seq_len: int
    micro_batch_size: int
    gradient_checkpointing: bool
    dtype_bytes: int = 2  # bf16
    gradient_accumulation: int = 2
    gpus: int = 1
    """Data-parallel processes, one GPU each: the estimate is per GPU."""

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch_size

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over all GPUs."""
        return self.micro_batch_size * self.gradient_accumulation * self.gpus

    @property
    def dtype(self) -> str:
        return {2: "bfloat16", 4: "float32"}[self.dtype_bytes]


def adam_state_bytes(numel: int, kind: str, dtype_bytes: int) -> int:
    """Two Adam moments of a tensor: 'plain' in the weights' dtype (torch AdamW), 'fp32'
    (GaLoreAdamW's 32-bit path), '8bit' (bitsandbytes blockwise: uint8 + fp32 absmax per block;
    tensors under 4096 values stay fp32)."""
    if kind == "plain":
        return 2 * numel * dtype_bytes
    if kind == "fp32" or numel < MIN_8BIT_SIZE:
        return 2 * numel * 4
    return 2 * (numel + 4 * -(-numel // BLOCKSIZE))


def _measured_layer_bytes(arch: Architecture, w: Workload, mode: str) -> int:
    d = w.dtype_bytes
    return w.tokens * (arch.activations[f"{mode}_{d}"] + arch.activations[f"per_position_{d}"] * w.seq_len)


def layer_activation_bytes(arch: Architecture, w: Workload) -> int:
    """Bytes one decoder layer keeps for backward without checkpointing (measured per token)."""
    return _measured_layer_bytes(arch, w, "trained")


def frozen_layer_activation_bytes(arch: Architecture, w: Workload, norms_train: bool = False) -> int:
    """A frozen decoder layer that gradients still pass through (LISA / OwLore) keeps less: no
    linear saves its input for a weight gradient (measured per token too). With `norms_train`
    (WeLore's layers) its norms keep what their weights' gradients need."""
    return _measured_layer_bytes(arch, w, "norms" if norms_train else "frozen")


def layer_backward_extra_bytes(arch: Architecture, w: Workload) -> int:
    """Gradient temporaries alive at once inside one layer's backward (MLP: two I-sized)."""
    return w.tokens * (2 * w.dtype_bytes * arch.intermediate_size + 4 * arch.hidden_size)


LOSS_TARGETS = ("every position counted as a target: exact for text data, an upper bound for prompt-masked "
                "formats (instruction, boolq, ...), whose loss covers the answers only")
"""What `logits_bytes` assumes: the loss multiplies only target positions by the head (loss.py), and
the planner sees no data, so it counts them all."""


def logits_bytes(arch: Architecture, w: Workload, head_trained: bool = True) -> int:
    """What the chunked loss (loss.py) holds: one chunk's float32 logits and log-softmax and a
    16-bit product or gradient beside them (8 + d bytes a logit, measured on fake tensors: the
    earlier 8 + 2d counted one 16-bit copy too many, 4% over at Gemma's 262k vocabulary), the
    target rows gathered and their gradient, and — formed in the loss's forward — the head's
    gradient when the head trains (targets: `LOSS_TARGETS`)."""
    chunk = min(w.tokens, LOSS_CHUNK_TOKENS)
    d = w.dtype_bytes
    if not head_trained:  # measured: float32 logits and log-softmax only
        return chunk * arch.vocab_size * 8 + 2 * w.tokens * arch.hidden_size * d
    head = arch.vocab_size * arch.hidden_size * d
    return chunk * arch.vocab_size * (8 + d) + 2 * w.tokens * arch.hidden_size * d + head


def activation_bytes(arch: Architecture, w: Workload, trained_from_layer: int = 0,
                     frozen_layers: int = 0, norms_train: bool = False) -> tuple[int, int]:
    """(kept activations, transient working set) at the backward peak.

    Layers below the first trainable one (with frozen embeddings) keep nothing; `frozen_layers`
    of the others keep a frozen layer's smaller set (without checkpointing; `norms_train`: their
    norms train)."""
    layers = arch.num_layers - trained_from_layer
    h, d = arch.hidden_size, w.dtype_bytes
    final_norm = w.tokens * d * h  # the lm_head's input (measured: the norm's fp32 copy is gone by then)
    if w.gradient_checkpointing:
        kept = layers * w.tokens * d * h + final_norm
        working = layer_activation_bytes(arch, w) + layer_backward_extra_bytes(arch, w)
        return kept, working
    kept = ((layers - frozen_layers) * layer_activation_bytes(arch, w)
            + frozen_layers * frozen_layer_activation_bytes(arch, w, norms_train) + final_norm)
    return kept, layer_backward_extra_bytes(arch, w)


def galore_matrix(lin: LinearShape, rank: int, d: int, bits: int) -> tuple[int, int, int, int]:
    """(projector, moments, accumulator, step temporaries) bytes of one GaLore matrix ('std')."""
    m, n = lin.out_features, lin.in_features
    r = min(rank, m, n)
    low = r * max(m, n)
    moments = adam_state_bytes(low, "8bit" if bits == 8 else "fp32", d)
    # step: the fp32 low-rank gradient and the direction (fp32), the direction cast to the weights' dtype
    temp = low * (4 + 4 + d)
    return r * min(m, n) * d, moments, 4 * low, temp


def sketch_bytes(lin: LinearShape, rank: int) -> int:
    """The two float32 sketches of one matrix's gradient at a basis step (rule `sketch`), or the
    gradient itself when that is smaller (optim/subspace.py's sketch_shape)."""
    d, big = min(lin.out_features, lin.in_features), max(lin.out_features, lin.in_features)
    k = min(rank + SKETCH_OVERSAMPLE, d)
    l = 2 * k + 1
    return 4 * min(d * big, d * k + l * big)


def sketch_finish_bytes(lin: LinearShape, rank: int) -> int:
    """Temporaries of turning one matrix's sketch into its basis: Q, X and the k x D product."""
    d, big = min(lin.out_features, lin.in_features), max(lin.out_features, lin.in_features)
    k = min(rank + SKETCH_OVERSAMPLE, d)
    return 4 * (d * k + 2 * k * big)


def rounding_bytes(largest: int, dtype_bytes: int) -> int:
    """Stochastic rounding's working block: the float32 value, update and random bits, and the
    rounded block, for at most ROUNDING_BLOCK values (none for float32 weights)."""
    return 0 if dtype_bytes == 4 else min(largest, ROUNDING_BLOCK) * (4 + 4 + 4 + dtype_bytes)
