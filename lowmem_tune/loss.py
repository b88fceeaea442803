"""The causal-LM loss computed a chunk of tokens at a time, so the float32 logits of a whole
micro-batch are never alive at once (for a 128k vocabulary they are 0.5 MB a token).

`causal_lm_loss(model, batch)` runs the decoder, gathers the hidden states of the positions whose
next label is a target (with prompt masking, a few in a hundred: the rest would be multiplied by
the head only to be ignored), then runs `ChunkedCrossEntropy` over those rows and the LM head's
weight: for each chunk of `chunk_tokens` positions it forms the logits,
their float32 log-softmax and loss, and at once the gradients the backward will need (softmax −
one-hot, pushed through the head into the hidden states and the head's weight); the logits are
dropped before the next chunk. The backward scales those gradients by the incoming one. The loss
and the gradients are HF's (mean over the target tokens, labels shifted by one, -100 ignored;
float32 logits, or float64 for a float64 model) up to summation order. Without gradients (an
evaluation) it forms no gradient at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowmem_tune.optim.norms import is_one_on_cpu

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                target_count: int | None = None) -> torch.Tensor:
        """hidden (N x h), weight (V x h), targets (N,): the cross entropy of hidden @ weightᵀ,
        summed over the targets and divided by their count (or by `target_count`)."""
        count = (targets != IGNORE_INDEX).sum().clamp(min=1) if target_count is None else max(target_count, 1)
        wants_hidden, wants_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None  # every row is written below
        grad_weight = (torch.empty_like(weight) if hidden.shape[0] else torch.zeros_like(weight)) if wants_weight else None
        wide = torch.promote_types(hidden.dtype, torch.float32)  # float32 at least, as HF's loss
        total = torch.zeros((), dtype=wide, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = min(chunk_tokens, hidden.shape[0] - start)
            h, t = hidden.narrow(0, start, rows), targets.narrow(0, start, rows)
            logits = (h @ weight.T).to(wide)
            keep = t != IGNORE_INDEX
            safe = torch.where(keep, t, 0)
            log_probs = torch.log_softmax(logits, dim=-1)
            del logits
            total = total - (log_probs.gather(1, safe[:, None]).squeeze(1) * keep).sum()
            if wants_hidden or wants_weight:
                grad_logits = log_probs.exp_()  # softmax, in place of the log-probabilities
                grad_logits[torch.arange(rows, device=t.device), safe] -= 1.0
                grad_logits = grad_logits.mul_(keep[:, None].to(wide) / count).to(hidden.dtype)
                if wants_hidden:
                    grad_hidden.narrow(0, start, rows).copy_(grad_logits @ weight)
                if wants_weight and start == 0:
                    torch.mm(grad_logits.T, h, out=grad_weight)
                elif wants_weight:
                    grad_weight.addmm_(grad_logits.T, h)
            del log_probs
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors  # scaled in place: no second copy of the head's gradient
        if not is_one_on_cpu(grad_loss):
            for grad in (grad_hidden, grad_weight):
                if grad is not None:
                    grad.mul_(grad_loss.to(grad.dtype))
        return grad_hidden, grad_weight, None, None, None


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], chunk_tokens: int = CHUNK_TOKENS,
                   target_count: int | None = None) -> torch.Tensor:
    """HF's causal-LM loss of `batch` (input_ids, attention_mask, labels, and optionally
    target_positions), computed in chunks: the mean over its target tokens, or their sum over
    `target_count` (a share of a larger batch)."""
    if not chunkable(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                     num_items_in_batch=target_count).loss
    return head_loss(model, decoder_hidden(model, batch), batch["labels"], chunk_tokens, target_count,
                     batch.get("target_positions"))


def chunkable(model: nn.Module) -> bool:
    """A plain linear head without bias or logit soft-capping (Llama, Mistral, Qwen2, Gemma 3);
    anything else takes the library's own loss."""
    head = model.get_output_embeddings()
    return getattr(head, "bias", None) is None and not getattr(model.config, "final_logit_softcapping", None)


def decoder_hidden(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                               use_cache=False).last_hidden_state


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into (batch x sequence) of the positions whose next label is a target. The
    training loop takes them from the batch while it is still on the host, where finding them
    costs no device synchronization."""
    wanted = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    wanted[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return wanted.reshape(-1).nonzero().squeeze(1)


def head_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS,
              target_count: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The chunked cross entropy of the head's logits against the next label, at the target
    positions only (`target_positions`, computed here when not given)."""
    if positions is None:
        positions = target_positions(labels)
    positions = positions.to(hidden.device, non_blocking=True)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    targets = labels.reshape(-1).index_select(0, positions + 1)
    weight = model.get_output_embeddings().weight
    if not torch.is_grad_enabled():  # autograd would still report the inputs as wanting gradients
        rows, weight = rows.detach(), weight.detach()
    return ChunkedCrossEntropy.apply(rows, weight, targets, chunk_tokens, target_count)
