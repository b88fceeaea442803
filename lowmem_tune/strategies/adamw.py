"""Baselines: full finetuning with AdamW (`full`) and with bitsandbytes' 8-bit AdamW (`adamw8bit`)."""

from __future__ import annotations

import torch
from torch import nn

from lowmem_tune.optim.updater import StandardUpdater, Updater
from lowmem_tune.strategies.base import Strategy, StrategyContext, trainable_parameters


class FullAdamW(Strategy):
    """Every weight trained with torch AdamW; moments in the weights' dtype (pure bf16 on GPU)."""

    name = "full"

    def build_updater(self, model: nn.Module, ctx: StrategyContext) -> Updater:
        t = self.profile.train
        params = trainable_parameters(model)
        optimizer = torch.optim.AdamW(
            params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
            foreach=not ctx.fake,
        )
        return StandardUpdater(optimizer, params, t.max_grad_norm)


class AdamW8bit(Strategy):
    """Every weight trained with bitsandbytes' blockwise 8-bit AdamW."""

    name = "adamw8bit"

    def build_updater(self, model: nn.Module, ctx: StrategyContext) -> Updater:
        import bitsandbytes as bnb

        t = self.profile.train
        params = trainable_parameters(model)
        optimizer = bnb.optim.AdamW8bit(
            params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay
        )
        return StandardUpdater(optimizer, params, t.max_grad_norm)
