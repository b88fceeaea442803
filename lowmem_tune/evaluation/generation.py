"""Greedy generation with stop strings, and answer extraction.

Extraction takes the first (or last) match of the card's pattern, whose word boundaries make
"no" not match inside "not". An output with no match is wrong and stays in the denominator —
unlike WeLore's scorer, which drops it and so reports a higher accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lowmem_tune.data.tokenize import encode
from lowmem_tune.evaluation.cards import AnswerPattern
from lowmem_tune.evaluation.loglikelihood import model_max_length


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    end = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:end]


def extract_answer(text: str, pattern: AnswerPattern) -> str | None:
    """The answer the pattern finds in a generated text, or None when there is none."""
    matches = [m.group(1) if m.groups() else m.group(0) for m in pattern.compiled().finditer(text)]
    if not matches:
        return None
    return matches[0] if pattern.pick == "first" else matches[-1]


def _number(text: str) -> float | None:
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return None


def answer_is_correct(predicted: str | None, gold: str, compare: str) -> bool:
    if predicted is None:
        return False
    if compare == "number":
        a, b = _number(predicted), _number(gold)
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return predicted.strip().lower() == gold.strip().lower()


class GreedyGenerator:
    """Greedy continuations of many prompts, a left-padded batch at a time (longest first); a
    prompt is encoded as training encodes it (`data.tokenize.encode`, BOS first when `bos`)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bos: bool, batch_size: int = 8,
                 max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.bos = bos
        self.batch_size = max(1, batch_size)
        self.max_length = max_length or model_max_length(model, tokenizer)

    def encode_prompts(self, contexts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """Prompt token ids, cut from the left to leave room for the answer, as lm-eval does."""
        room = max(1, self.max_length - max_new_tokens)
        return [ids[-room:] for ids in encode(self.tokenizer, contexts, self.bos)]

    @torch.inference_mode()
    def generate(self, contexts: Sequence[str], max_new_tokens: int, stop: Sequence[str],
                 progress: Callable[[int], None] | None = None) -> list[str]:
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True,
                                  pad_token_id=pad_id, eos_token_id=tok.eos_token_id, stop_strings=list(stop) or None)
        encoded = self.encode_prompts(contexts, max_new_tokens)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        outputs = [""] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(encoded[i])
                ids[row, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, width - n:] = 1
            generated = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                            generation_config=config, tokenizer=tok)
            for row, i in enumerate(batch):
                text = tok.decode(generated[row, width:], skip_special_tokens=True)
                outputs[i] = cut_at_stop(text, stop)
            if progress is not None:
                progress(len(batch))
        return outputs
