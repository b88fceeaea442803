"""Tokenization for training: prompt masking, left truncation, packing, and a small tokenizer
trained locally for random-init models (no hub needed)."""

from __future__ import annotations

from typing import Iterable, Sequence

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lowmem_tune.data.examples import Example
from lowmem_tune.errors import UserError

IGNORE_INDEX = -100
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def train_local_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`: spaces survive decoding. With room for them
    (a vocabulary of 384 or more) all 256 bytes are in the alphabet, so any text encodes; smaller
    vocabularies keep only the characters the texts use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if vocab_size >= 384 else [],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer itself puts BOS in front (Llama's, Mistral's and Gemma's do; our local
    one does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def bos_first(tokenizer: PreTrainedTokenizerBase, add_bos: bool | None = None) -> bool:
    """Whether every sequence the model is given, in training and in evaluation, begins with BOS.

    None: what the tokenizer does on its own, which is lm-evaluation-harness 0.4's default (its
    `add_bos_token` None); True / False override it, as the harness's `add_bos_token` does.
    """
    if add_bos is None:
        return adds_bos(tokenizer)
    if add_bos and tokenizer.bos_token_id is None:
        raise UserError("eval.add_bos / --add-bos: the tokenizer has no BOS token to add; leave it unset (the tokenizer's "
                        "default) or set it to false")
    return add_bos


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], bos: bool) -> list[list[int]]:
    """Token ids of each text, BOS first when `bos`: the one encoding training and evaluation use.

    A text that already begins with the BOS token's text gets no second one (the tokenizer reads
    that text as the token), as in lm-evaluation-harness' `tok_encode`.
    """
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if not bos:
        return [list(x) for x in ids]
    bos_text = tokenizer.bos_token
    return [list(x) if bos_text and text.startswith(bos_text) else [tokenizer.bos_token_id, *x]
            for text, x in zip(texts, ids)]


def tokenize_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                     train_on_prompt: bool, bos: bool) -> dict[str, list[int]]:
    """Prompt and response tokenized separately and concatenated, EOS last, BOS first when `bos`
    (`bos_first`, which evaluation follows too); too long: the prompt is cut from the left so the
    response survives."""
    [prompt] = encode(tokenizer, [example.prompt], bos)
    [response] = encode(tokenizer, [example.response], bos=False)
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    overflow = len(prompt) + len(response) - max_seq_len
    if overflow > 0:
        keep = max(len(prompt) - overflow, 0)
        prompt = prompt[len(prompt) - keep:]
        response = response[: max_seq_len - len(prompt)]
    labels = (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + response
    return {"input_ids": prompt + response, "labels": labels}


def tokenize_examples(examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                      train_on_prompt: bool, packing: bool, add_bos: bool | None = None) -> list[dict[str, list[int]]]:
    bos = bos_first(tokenizer, add_bos)
    items = [tokenize_example(e, tokenizer, max_seq_len, train_on_prompt, bos) for e in examples]
    return pack(items, max_seq_len) if packing else items


def pack(items: list[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into sequences of up to `max_seq_len` tokens without splitting one.

    Packed examples attend to each other (no block-diagonal mask), the usual trade-off for speed.
    """
    packed: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": []}
    for item in items:
        if current["input_ids"] and len(current["input_ids"]) + len(item["input_ids"]) > max_seq_len:
            packed.append(current)
            current = {"input_ids": [], "labels": []}
        current["input_ids"] = current["input_ids"] + item["input_ids"]
        current["labels"] = current["labels"] + item["labels"]
    if current["input_ids"]:
        packed.append(current)
    return packed
