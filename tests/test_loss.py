"""The chunked causal-LM loss: HF's loss and gradients, with the logits of one chunk alive."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowmem_tune.catalog import resolve_model
from lowmem_tune.loss import ChunkedCrossEntropy, causal_lm_loss, decoder_hidden, target_positions
from lowmem_tune.modeling import load_model


@pytest.fixture(scope="module")
def model64():
    return load_model(resolve_model("tiny-llama"), "random", torch.float64, torch.device("cpu"), seed=0)


def batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3, 40), generator=gen)
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt the loss ignores
    labels[2, 30:] = -100  # and padding
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_equals_the_unchunked_one_and_its_gradients(model64, chunk):
    """HF's definition (shift by one, mean over targets, -100 ignored) on the full float64
    logits, against the chunked loss: the same loss and every parameter's gradient within 1e-10."""
    b = batch()
    ours, reference = copy.deepcopy(model64), copy.deepcopy(model64)
    loss = causal_lm_loss(ours, b, chunk_tokens=chunk)
    logits = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # float64
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 b["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(loss) - float(expected)) <= 1e-10 * abs(float(expected))
    loss.backward()
    expected.backward()
    for (name, a), (_, r) in zip(ours.named_parameters(), reference.named_parameters()):
        assert float((a.grad - r.grad).abs().max()) <= 1e-10 * float(r.grad.abs().max()), name


class LogitsBytes(TorchDispatchMode):
    """The largest new tensor (not a view of an input) with a vocabulary-sized last dimension
    that any op creates."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_live_logits_stay_at_one_chunk(model64):
    """3 x 39 target positions: unchunked, the float logits of all 117 exist at once; chunked by
    16, no vocabulary-wide tensor is larger than 16 rows."""
    vocab = model64.config.vocab_size
    model = copy.deepcopy(model64).float()
    b = batch(1)
    unchunked, chunked = LogitsBytes(vocab), LogitsBytes(vocab)
    with unchunked:
        model(**b).loss.backward()
    with chunked:
        causal_lm_loss(model, b, chunk_tokens=16).backward()
    assert unchunked.largest >= 117 * vocab * 4
    assert chunked.largest <= 16 * vocab * 4


def test_tied_embeddings_get_both_gradients():
    """A tied model (Qwen2.5-0.5B, Llama-3.2-1B are): the head's weight is the embedding table, and
    its gradient is the sum of both uses, as without chunking."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).double()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    b = batch(2)
    ours, reference = copy.deepcopy(model), copy.deepcopy(model)
    causal_lm_loss(ours, b, chunk_tokens=5).backward()
    logits = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), b["labels"][:, 1:].reshape(-1),
                                      ignore_index=-100).backward()
    a, r = ours.get_input_embeddings().weight.grad, reference.get_input_embeddings().weight.grad
    assert float((a - r).abs().max()) <= 1e-10 * float(r.abs().max())


def ungathered_loss(model, b, chunk, target_count=None):
    """The loss before target gathering: every position's hidden state through the head."""
    hidden = decoder_hidden(model, b)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return ChunkedCrossEntropy.apply(flat, model.get_output_embeddings().weight, b["labels"][:, 1:].reshape(-1),
                                     chunk, target_count)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_gathered_targets_give_the_loss_and_gradients_of_every_position(masked, accumulate):
    """float32: gathering the target rows before the head changes the loss and every gradient by
    summation order only (1e-6 relative), for prompt-masked and fully labelled data, in one
    micro-batch and accumulated over two (the training loop's sum over all targets)."""
    model = load_model(resolve_model("tiny-llama"), "random", torch.float32, torch.device("cpu"), seed=0)
    batches = [batch(seed) for seed in range(accumulate)]
    for b in batches:
        if not masked:
            b["labels"] = b["input_ids"].clone()
            b["attention_mask"] = torch.ones_like(b["input_ids"])
        b["target_positions"] = target_positions(b["labels"])
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert masked == (targets < accumulate * 3 * 39)
    ours, reference = copy.deepcopy(model), copy.deepcopy(model)
    losses = [(causal_lm_loss(ours, b, chunk_tokens=16, target_count=targets),
               ungathered_loss(reference, b, 16, targets)) for b in batches]
    for got, expected in losses:
        assert abs(float(got) - float(expected)) <= 1e-6 * abs(float(expected))
    sum(g for g, _ in losses).backward()
    sum(e for _, e in losses).backward()
    for (name, a), (_, r) in zip(ours.named_parameters(), reference.named_parameters()):
        assert float((a.grad - r.grad).abs().max()) <= 1e-6 * float(r.grad.abs().max()), name


class NewTensorShapes(TorchDispatchMode):
    """The shapes of the tensors ops create (not views of their inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.shapes.update(tuple(t.shape) for t in tree_leaves(out)
                           if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs)
        return out


def test_an_evaluation_forms_no_gradient_of_the_head():
    model = load_model(resolve_model("tiny-llama"), "random", torch.float32, torch.device("cpu"), seed=0)
    head = tuple(model.get_output_embeddings().weight.shape)
    b = batch(3)
    trained = NewTensorShapes()
    with trained:
        causal_lm_loss(model, b)
    assert head in trained.shapes  # with gradients on, the loss's forward forms the head's gradient
    evaluated = NewTensorShapes()
    with torch.no_grad(), evaluated:
        loss = causal_lm_loss(model, b)
    assert head not in evaluated.shapes
    with torch.no_grad():
        expected = float(ungathered_loss(model, b, 1024))
    assert abs(float(loss) - expected) <= 1e-6 * expected


def test_the_incoming_gradient_scales_the_head_and_hidden_gradients(model64):
    """A loss divided by 2 (accumulation over two micro-batches) gives exactly half of every
    gradient; undivided, the multiplication by 1 is skipped and the gradients are the same."""
    b = batch()
    halved, whole = copy.deepcopy(model64), copy.deepcopy(model64)
    (causal_lm_loss(halved, b) / 2).backward()
    causal_lm_loss(whole, b).backward()
    for (name, h), (_, w) in zip(halved.named_parameters(), whole.named_parameters()):
        assert torch.equal(h.grad * 2, w.grad), name
