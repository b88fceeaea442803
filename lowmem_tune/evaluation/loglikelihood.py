"""Batched log-likelihood of continuations, with lm-evaluation-harness' token boundary.

Boundary (lm-eval 0.4 `_encode_pair`): trailing whitespace of the context moves to the start of
the continuation; the context is tokenized on its own and the continuation tokens are what the
tokenization of context + continuation holds after the context's token count. That equals
tokenizing the two separately and concatenating whenever no token straddles the boundary, and
stays right for SentencePiece tokenizers, which would add a spurious leading "▁" to a
continuation tokenized alone. Both are encoded as training encodes (`data.tokenize.encode`): BOS
first where `bos_first` says so, which by default is what the tokenizer does on its own, as in
lm-eval 0.4.13 (`add_bos_token` None). An empty context becomes the BOS (else EOS) token, or the
continuation's first token when that is the same token. Sequences longer than the model's context
are cut from the left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lowmem_tune.data.tokenize import encode
from lowmem_tune.modeling import logits_at

TokenPair = tuple[list[int], list[int]]

_UNSET_MODEL_MAX_LENGTH = 1000000000000000019884624838656  # transformers' "no limit" sentinel
DEFAULT_MAX_LENGTH = 2048


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the front of the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _prefix_token(tokenizer: PreTrainedTokenizerBase) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return token


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], bos: bool) -> list[TokenPair]:
    """Token ids of (context, continuation) pairs, tokenized in two batched calls; BOS first when `bos`."""
    moved = [split_trailing_space(ctx, cont) for ctx, cont in pairs]
    context_ids = encode(tokenizer, [ctx for ctx, _ in moved], bos)
    whole_ids = encode(tokenizer, [ctx + cont for ctx, cont in moved], bos)
    out: list[TokenPair] = []
    for (ctx, cont), ctx_ids, whole in zip(moved, context_ids, whole_ids):
        if ctx:
            out.append((ctx_ids, whole[len(ctx_ids):]))
            continue
        [cont_ids] = encode(tokenizer, [cont], bos=False)
        prefix = _prefix_token(tokenizer)
        out.append(([prefix], cont_ids) if cont_ids[:1] != [prefix] else (cont_ids[:1], cont_ids[1:]))
    return out


def model_max_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The context length lm-eval uses: the model config's, else the tokenizer's, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    if tokenizer.model_max_length and tokenizer.model_max_length != _UNSET_MODEL_MAX_LENGTH:
        return int(tokenizer.model_max_length)
    return DEFAULT_MAX_LENGTH


class LoglikelihoodScorer:
    """Sum of log p(continuation tokens | context) for many pairs, a batch at a time.

    Requests with the same input run once. Sequences are sorted longest first (so a batch pads
    little) and right-padded: under causal attention, padding after a sequence cannot change its
    logits. Only the continuation positions reach the LM head (`modeling.logits_at`), and their
    log-softmax runs in float32.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8,
                 max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self.max_length = max_length or model_max_length(model, tokenizer)

    @torch.inference_mode()
    def score(self, pairs: Sequence[TokenPair], progress: Callable[[int], None] | None = None) -> list[float]:
        device = next(self.model.parameters()).device
        # lm-eval: keep the last max_length + 1 tokens, feed all but the last.
        inputs = [tuple((ctx + cont)[-(self.max_length + 1):][:-1]) for ctx, cont in pairs]
        targets = [cont[-len(inp):] if len(cont) > len(inp) else cont for (_, cont), inp in zip(pairs, inputs)]
        # Requests with the same input have the same logits (the choices of a question whose
        # continuations are one token each: BoolQ's " yes" / " no"), so each input runs once, as
        # lm-eval's grouping by context does.
        sharing: dict[tuple[int, ...], list[int]] = {}
        for i, inp in enumerate(inputs):
            sharing.setdefault(inp, []).append(i)
        unique = sorted(sharing, key=len, reverse=True)
        results = [0.0] * len(pairs)
        for start in range(0, len(unique), self.batch_size):
            batch = unique[start:start + self.batch_size]
            width = len(batch[0])
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            rows, tokens, owners = [], [], []
            first = 0  # the first kept position of this input, counted over the batch's kept rows
            for row, inp in enumerate(batch):
                need = max(len(targets[i]) for i in sharing[inp])
                ids[row, :len(inp)] = torch.tensor(inp)
                keep[row, len(inp) - need:len(inp)] = True  # positions whose next token is a target
                for i in sharing[inp]:
                    rows += range(first + need - len(targets[i]), first + need)
                    tokens += targets[i]
                    owners += [i] * len(targets[i])
                first += need
            logits = logits_at(self.model, ids.to(device), keep.to(device))
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (kept positions, vocab), row-major
            token_lls = logprobs[torch.tensor(rows, device=device), torch.tensor(tokens, device=device)]
            owner_ids = sorted(set(owners))
            slot = {i: k for k, i in enumerate(owner_ids)}
            sums = torch.zeros(len(owner_ids), dtype=torch.float64, device=device).index_add_(
                0, torch.tensor([slot[i] for i in owners], device=device), token_lls.double())
            for i, total in zip(owner_ids, sums.tolist()):
                results[i] = total
            if progress is not None:
                progress(len(owner_ids))
        return results
