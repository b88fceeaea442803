"""Baselines: full finetuning with AdamW (`full`) and with bitsandbytes' 8-bit AdamW (`adamw8bit`).

Both optimizers write their updates into the weights themselves, rounding to nearest: in bf16 an
update below half a weight's ulp is lost (strategy.rounding is for the methods we update).
"""

from __future__ import annotations

from lowmem_tune.strategies.base import Strategy


class FullAdamW(Strategy):
    """Every weight trained with torch AdamW; moments in the weights' dtype (pure bf16 on GPU)."""

    name = "full"
    optimizer = "adamw"


class AdamW8bit(Strategy):
    """Every weight trained with bitsandbytes' blockwise 8-bit AdamW."""

    name = "adamw8bit"
    optimizer = "adamw8bit"
