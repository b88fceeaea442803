"""Decoder weights in NF4 for QLoRA: bitsandbytes' `Linear4bit` (4-bit NormalFloat codes, a scale per
64 values, the scales themselves quantized to 8 bits: double quantization), computing in 16 bits.

The 16-bit model is loaded on the CPU and each decoder layer is quantized as it moves to the device,
one layer at a time, as the INT8 weights are (quantize.py): the device never holds the 16-bit
decoder. bitsandbytes runs NF4 on the CPU too (dequantize, then a 16-bit matmul).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lowmem_tune.layers import decoder_layers, move_to

NF4_BLOCK = 64
"""Values per NF4 scale (bitsandbytes' default block size for 4-bit weights)."""


def quantize_decoder_nf4(model: nn.Module, compute_dtype: torch.dtype, device: torch.device,
                         fake: bool = False) -> None:
    """Replace every nn.Linear inside the decoder layers by an NF4 `Linear4bit` (double
    quantization, `compute_dtype` matmuls), frozen, a layer at a time on its way to `device`.
    `fake` (`plan --verify`): bitsandbytes' Params4bit cannot wrap a fake tensor, so the codes are
    a plain parameter carrying what Linear4bit and peft read from a Params4bit."""
    import bitsandbytes as bnb

    for layer in decoder_layers(model):
        move_to(layer, device)
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                with _outside_fake_mode() if fake else contextlib.nullcontext():  # meta: no storage either way
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                                  compute_dtype=compute_dtype, compress_statistics=True,
                                                  quant_type="nf4", device="meta")
                codes, state = bnb.functional.quantize_4bit(child.weight.data, blocksize=NF4_BLOCK,
                                                            compress_statistics=True, quant_type="nf4")
                settings = {"blocksize": NF4_BLOCK, "compress_statistics": True, "quant_type": "nf4"}
                if fake:
                    weight = nn.Parameter(codes, requires_grad=False)
                    for key, value in {**settings, "quant_state": state, "bnb_quantized": True}.items():
                        setattr(weight, key, value)
                else:
                    weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state, bnb_quantized=True,
                                               module=quantized, **settings)
                quantized.weight = weight
                quantized.bias = None if child.bias is None else nn.Parameter(child.bias.data, requires_grad=False)
                # bitsandbytes 0.50, on CPUs with AVX512-BF16, repacks a weight for inference at the
                # first no-grad forward in eval mode and back at the next save or train forward; the
                # round trip rounds its scales through bf16, so every evaluation would move the frozen
                # base a little (and a resumed run would differ): keep the one layout training uses
                quantized.support_avx512bf16_for_cpu = False
                setattr(parent, child_name, quantized)
    move_to(model, device)


def _outside_fake_mode() -> contextlib.AbstractContextManager:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def dequantized_nf4(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """An NF4 Linear4bit's weight in `dtype`, on its device."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(linear.weight.data, linear.weight.quant_state).to(dtype)
