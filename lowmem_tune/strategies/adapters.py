"""`lora`, `qlora` and `dora`: the adapter methods most other tools default to, through peft.

The base model is frozen — in the run's 16-bit dtype (`lora`, `dora`) or in NF4 with double
quantization (`qlora`, nf4.py) — and low-rank adapters on the decoder's linears train with AdamW
(peft keeps them in float32). DoRA (`use_dora`) adds a trained magnitude per output channel.
Embeddings and the head stay frozen: these are not full-parameter methods, and the planner lists
them apart (planner/search.py).

A checkpoint holds the adapter's tensors only (the base is reloaded from model.name, so resuming is
exact). `final/` is the merged model, a plain transformers checkpoint that `eval`, `compress` and
`inspect` read as any other — for QLoRA merged into the dequantized base, in the run's dtype — and
`final/adapter/` the adapter in peft's own format (`PeftModel.from_pretrained(base, ...)`).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lowmem_tune.errors import UserError
from lowmem_tune.layers import decoder_layers, layer_linears, move_to
from lowmem_tune.nf4 import dequantized_nf4, quantize_decoder_nf4
from lowmem_tune.strategies.base import Strategy, StrategyContext, trainable_parameters

ADAPTER_NAME = "default"
"""peft's name for a model's one adapter."""


class LoRA(Strategy):
    """Low-rank adapters on a frozen 16-bit base (Hu et al. 2021)."""

    name = "lora"
    optimizer = "adamw"
    base_bits = 16
    use_dora = False

    def __init__(self, profile) -> None:
        super().__init__(profile)
        if self.cfg.train_embeddings:
            raise UserError(
                f"strategy.train_embeddings: {self.name} trains adapters on the decoder's linears only; "
                "remove the key, or choose a full-parameter strategy (galore, owlore, full) to train embeddings"
            )
        self.peft_model: nn.Module | None = None
        self.counts = (0, 0)

    @property
    def loads_on_cpu(self) -> bool:
        return self.base_bits == 4  # quantized a layer at a time on its way to the device

    def target_modules(self, model: nn.Module) -> list[str]:
        """`strategy.target_modules`, checked against the decoder's linears (default: all of them)."""
        known = list(layer_linears(decoder_layers(model)[0]))
        chosen = self.cfg.target_modules or known
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            raise UserError(
                f"strategy.target_modules: {', '.join(unknown) or 'an empty list'} names no linear of this model's "
                f"decoder layers; choose among: {', '.join(known)}"
            )
        return chosen

    def prepare_model(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = self.target_modules(model)
        base = sum(p.numel() for p in model.parameters())  # before NF4 packs two values a byte
        if self.base_bits == 4:
            quantize_decoder_nf4(model, ctx.dtype, ctx.device, ctx.fake)
        else:
            model = move_to(model, ctx.device)
        model.requires_grad_(False)
        config = LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                            target_modules=targets, use_dora=self.use_dora, bias="none", task_type="CAUSAL_LM")
        # peft keeps the adapters in float32 (autocast_adapter_dtype); the loop keeps training the
        # transformers model, which peft changed in place
        with _adapters_stay_where_made() if ctx.fake else contextlib.nullcontext(), warnings.catch_warnings():
            # peft reads a property transformers 5 renamed; the warning is about peft, not this run
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
        trained = sum(p.numel() for p in trainable_parameters(model))
        self.counts = (trained, base + trained)
        ctx.info(f"{self.name}: rank {self.cfg.lora_rank} adapters on {', '.join(targets)}"
                 f"{' over an NF4 base' if self.base_bits == 4 else ''}; {trained:,} of {self.counts[1]:,} "
                 "parameters train")
        return model

    def describe(self) -> dict[str, Any]:
        trained, total = self.counts
        return {"name": self.name, "lora_rank": self.cfg.lora_rank, "lora_alpha": self.cfg.lora_alpha,
                "lora_dropout": self.cfg.lora_dropout, "base_bits": self.base_bits,
                "trainable_parameters": trained, "total_parameters": total}

    def checkpoint_keys(self, model: nn.Module) -> set[str] | None:
        names = {id(p) for p in trainable_parameters(model)}
        return {name for name, p in model.named_parameters() if id(p) in names}

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        """The adapter (peft's format) in out_dir/adapter, then the merged model in out_dir."""
        self.peft_model.save_pretrained(out_dir / "adapter", safe_serialization=True)
        self.merge(model, out_dir)

    def merge(self, model: nn.Module, out_dir: Path) -> None:
        # peft merges into the 16-bit weights in place (DoRA's magnitudes included); training is over
        self.peft_model.merge_and_unload()
        model.save_pretrained(out_dir, safe_serialization=True)


@contextlib.contextmanager
def _adapters_stay_where_made() -> Iterator[None]:
    """Under `plan --verify`: peft moves each new adapter to its base layer's device and dtype with
    `Module.to`, which on fake tensors swaps every parameter, and torch refuses to swap a fake
    parameter. The fake model is on the CPU, where the adapters are made, and peft casts them to
    float32 afterwards, which is what they are made in: skipping the moves that stay on the CPU
    changes nothing but that."""
    to = nn.Module.to

    def to_unless_on(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is None or all(t.device == device for t in (*module.parameters(), *module.buffers())):
            return module
        return to(module, *args, **kwargs)

    nn.Module.to = to_unless_on
    try:
        yield
    finally:
        nn.Module.to = to


class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation (Liu et al. 2024): LoRA for the direction, a trained
    magnitude per output channel."""

    name = "dora"
    use_dora = True


class QLoRA(LoRA):
    """LoRA over an NF4 base with double quantization, 16-bit compute (Dettmers et al. 2023)."""

    name = "qlora"
    base_bits = 4

    def merge(self, model: nn.Module, out_dir: Path) -> None:
        """Merged into the dequantized base in the run's dtype, a matrix at a time on the device
        (peft's own merge would quantize the sum back to NF4)."""
        from peft.tuners.lora import LoraLayer

        dtype = model.get_input_embeddings().weight.dtype
        dense: dict[str, torch.Tensor] = {}
        for key, value in model.state_dict().items():
            if ".lora_" in key or not key.endswith((".weight", ".bias")) or ".weight." in key:
                continue  # adapter tensors and NF4 quantization statistics
            dense[key.replace(".base_layer.", ".")] = value.detach().cpu()
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                base = dequantized_nf4(module.get_base_layer(), dtype)
                delta = module.get_delta_weight(ADAPTER_NAME).to(dtype)
                dense[f"{name}.weight"] = (base + delta).cpu()
        model.save_pretrained(out_dir, state_dict=dense, safe_serialization=True)


__all__ = ["DoRA", "LoRA", "QLoRA"]
