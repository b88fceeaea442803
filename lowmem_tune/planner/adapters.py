"""What the adapter methods (LoRA, DoRA, QLoRA; strategies/adapters.py) hold beyond the frozen model:
the base in 16 bits or NF4, float32 adapters on the target linears of every layer, and what peft
keeps for their backward. Measured against `plan --verify` on fake tensors (peft's real code):
within 2.3 % at llama-2-7b and 0.2 % at gemma-3-270m, with and without checkpointing and dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowmem_tune.planner.architecture import Architecture, LinearShape
from lowmem_tune.planner.components import Workload
from lowmem_tune.profile import StrategySection

NF4_BLOCK = 64  # nf4.py: values per NF4 scale
NESTED_BLOCK = 256  # bitsandbytes: 8-bit scales per float32 scale of the second level
_INPUT_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
"""Linears of a decoder layer that read the same tensor."""


@dataclass
class AdapterMemory:
    weights: int
    """The whole model: its frozen base (the decoder linears in NF4 for QLoRA) and the adapters."""
    parameters: int
    """Adapter values (float32), all layers: their gradients and two AdamW moments are as many."""
    largest: int
    """The largest adapter tensor (torch AdamW's temporaries)."""
    layer_transient: int
    """Made and freed inside one layer's forward or backward (QLoRA's dequantized weight, DoRA's norm)."""
    layer_extra: int
    """What one layer's adapters keep for backward, on top of a frozen layer."""
    notes: list[str] = field(default_factory=list)


def nf4_bytes(numel: int) -> int:
    """An NF4 weight with double quantization: 4-bit codes, an 8-bit scale per 64 values and a
    float32 scale per 256 of those."""
    blocks = -(-numel // NF4_BLOCK)
    return numel // 2 + blocks + 4 * -(-blocks // NESTED_BLOCK)


def adapter_memory(arch: Architecture, s: StrategySection, w: Workload, base_bytes: int) -> AdapterMemory:
    """`base_bytes`: the model in the run's dtype, as every strategy starts from."""
    d, r = w.dtype_bytes, s.lora_rank
    targets = [lin for lin in arch.linears if s.target_modules is None or lin.name in s.target_modules]
    magnitude = s.name == "dora"
    sizes = [r * lin.in_features for lin in targets] + [r * lin.out_features for lin in targets]
    sizes += [lin.out_features for lin in targets] if magnitude else []
    adapter = sum(sizes) * arch.num_layers
    weights, transient, notes = base_bytes, 0, []
    if s.name == "qlora":
        linear = sum(lin.out_features * lin.in_features for lin in arch.linears)
        weights = (arch.params - linear * arch.num_layers) * d + nf4_bytes(linear) * arch.num_layers
        # bitsandbytes dequantizes the whole weight for each matmul, forward and backward
        transient = d * max(lin.out_features * lin.in_features for lin in arch.linears)
        notes.append("NF4 decoder weights (double quantization), 16-bit compute")
    if magnitude:  # DoRA's weight norm: B A made by passing an in x in identity through the adapter,
        # then W + B A and its norm, in float32, one target at a time in forward
        biggest = max(targets, key=lambda lin: lin.out_features * lin.in_features + lin.in_features ** 2)
        transient = max(transient, 4 * (biggest.in_features ** 2 + 3 * biggest.out_features * biggest.in_features))
    notes.append(f"not full-parameter: trains {adapter:,} adapter parameters "
                 f"({adapter / arch.params:.2%} of the model); embeddings and head frozen")
    return AdapterMemory(weights + 4 * adapter, adapter, max(sizes), transient,
                         _layer_extra(targets, r, s.lora_dropout > 0, magnitude, w), notes)


def _layer_extra(targets: list[LinearShape], rank: int, dropout: bool, magnitude: bool, w: Workload) -> int:
    """What one layer's adapters keep for backward over a frozen layer: each keeps its input in
    float32 (peft casts it to the adapters' dtype: a copy per target in 16-bit runs), the output
    of its dropout, and its rank-wide intermediate; DoRA also the base output and the adapter's
    output, to train the magnitude (with dropout: the base output recomputed in float32 from the
    dropped input, and the float32 copy of the weight it used)."""
    d = w.dtype_bytes
    per_token = 0
    inputs: set[tuple[str, int]] = set()
    for lin in targets:
        if d != 4:
            per_token += 4 * lin.in_features
        else:  # float32 run: the input itself, shared by the linears that read it
            inputs.add((_INPUT_OF.get(lin.name, lin.name), lin.in_features))
        if dropout:
            per_token += 4 * lin.in_features  # the dropout's float32 output (measured: the mask adds nothing)
        per_token += 4 * rank
        if magnitude:
            per_token += (4 if dropout else d) * lin.out_features + 4 * lin.out_features
    per_token += 4 * sum(size for _, size in inputs)
    weights = 4 * sum(lin.out_features * lin.in_features for lin in targets) if magnitude and dropout and d != 4 else 0
    return per_token * w.tokens + weights
