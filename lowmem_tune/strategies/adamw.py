"""Baselines: full finetuning with AdamW (`full`) and with 8-bit AdamW (`adamw8bit`).

With 16-bit weights and `strategy.rounding: stochastic` (the default) both run through our AdamW
(fp32 moments, or bitsandbytes' blockwise 8-bit ones), which writes each update with stochastic
rounding: torch's and bitsandbytes' optimizers round to nearest, and in bf16 an update below half a
weight's ulp is lost (at lr 1e-5, most of them). `rounding: nearest` runs torch AdamW (moments in the
weights' dtype) and bitsandbytes' AdamW8bit themselves, as other tools do.
"""

from __future__ import annotations

from lowmem_tune.strategies.base import Strategy


class FullAdamW(Strategy):
    """Every weight trained with AdamW."""

    name = "full"
    optimizer = "adamw"


class AdamW8bit(Strategy):
    """Every weight trained with blockwise 8-bit AdamW (bitsandbytes' quantization)."""

    name = "adamw8bit"
    optimizer = "adamw8bit"
