"""Tokenization for training: prompt masking, left truncation, packing, and a small tokenizer
trained locally for random-init models (no hub needed)."""

from __future__ import annotations

from typing import Iterable

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lowmem_tune.data.examples import Example

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
    """Whether the tokenizer itself puts BOS in front (Llama's does; our local one does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def tokenize_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                     train_on_prompt: bool, with_bos: bool) -> dict[str, list[int]]:
    """Prompt and response tokenized separately and concatenated, EOS last, BOS first only where
    the tokenizer adds one itself (so evaluation, which uses the tokenizer's own behaviour, sees
    what training saw); too long: the prompt is cut from the left so the response survives."""
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    if with_bos:
        prompt = [tokenizer.bos_token_id] + prompt
    overflow = len(prompt) + len(response) - max_seq_len
    if overflow > 0:
        keep = max(len(prompt) - overflow, 0)
        prompt = prompt[len(prompt) - keep:]
        response = response[: max_seq_len - len(prompt)]
    labels = (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + response
    return {"input_ids": prompt + response, "labels": labels}


def tokenize_examples(examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                      train_on_prompt: bool, packing: bool) -> list[dict[str, list[int]]]:
    with_bos = adds_bos(tokenizer)
    items = [tokenize_example(e, tokenizer, max_seq_len, train_on_prompt, with_bos) for e in examples]
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
