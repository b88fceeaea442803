"""Tokenization for training: prompt masking, conversations with the loss on their assistant turns,
truncation that keeps answers whole (`data.truncation`), packing, and a small tokenizer trained
locally for random-init models (no hub needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lowmem_tune.data.chat import (
    ChatTemplate,
    Message,
    Render,
    answer_spans,
    exchange_starts,
    renderer,
    without_earliest,
)
from lowmem_tune.data.examples import Example
from lowmem_tune.errors import UserError
from lowmem_tune.profile import TRUNCATIONS

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
    return [[tokenizer.bos_token_id, *x] if needs_bos(tokenizer, text, bos) else list(x) for text, x in zip(texts, ids)]


def needs_bos(tokenizer: PreTrainedTokenizerBase, text: str, bos: bool) -> bool:
    """Whether `text` gets a BOS in front: when sequences begin with one (`bos`) and the text does not
    already begin with the BOS token's text (a chat template that writes it, a prompt that has it)."""
    bos_text = tokenizer.bos_token
    return bool(bos) and not (bool(bos_text) and text.startswith(bos_text))


OUTCOMES = ("whole", "prompt_cut", "turns_cut", "text_cut", "dropped")


@dataclass(frozen=True)
class TokenizedExample:
    """One example under the truncation policy: its item (None when dropped) and what was done."""

    item: dict[str, list[int]] | None
    outcome: str
    """whole, prompt_cut (cut from the left), turns_cut (a conversation's earliest exchanges left out),
    text_cut (an example without a prompt, cut at the end), dropped."""
    length: int
    """Tokens of the whole example: BOS, prompt, response, EOS (a conversation: BOS and its text)."""
    answer: int
    """Tokens the answer needs to be trained whole: BOS, response, EOS (a conversation: its system
    message and last exchange)."""


@dataclass
class TruncationReport:
    """What tokenizing a list of examples did to them (counts of examples), and the tokens kept."""

    examples: int = 0
    whole: int = 0
    prompt_cut: int = 0
    turns_cut: int = 0
    text_cut: int = 0
    dropped: int = 0
    tokens: int = 0
    """Tokens of the kept items (after packing: the same tokens)."""
    loss_tokens: int = 0
    """Tokens the loss is computed on: labels that are targets, the first of each sequence excluded (the
    loss predicts each token from those before it)."""
    longest_answer: int = 0
    """Tokens of the longest answer (BOS, response, EOS); for examples without a prompt, the whole text;
    for conversations, the system message and the last exchange."""
    lengths: list[int] = field(default_factory=list, repr=False)
    """Each example's whole length in tokens, kept or not."""
    chat: bool = False
    """The examples are conversations (their answers are last exchanges)."""

    @property
    def kept(self) -> int:
        return self.examples - self.dropped

    @property
    def changed(self) -> bool:
        return bool(self.prompt_cut or self.turns_cut or self.text_cut or self.dropped)

    @property
    def loss_share(self) -> float:
        return self.loss_tokens / self.tokens if self.tokens else 0.0

    def percentiles(self) -> dict[str, int]:
        """p50, p90, p99 (nearest rank) and max of the examples' whole lengths; {} for no examples."""
        ordered = sorted(self.lengths)
        if not ordered:
            return {}
        rank = {q: ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1] for q in (50, 90, 99)}
        return {"p50": rank[50], "p90": rank[90], "p99": rank[99], "max": ordered[-1]}

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "whole": self.whole, "prompt_cut": self.prompt_cut,
                "turns_cut": self.turns_cut, "text_cut": self.text_cut, "dropped": self.dropped, "kept": self.kept,
                "tokens": self.tokens, "loss_tokens": self.loss_tokens, "loss_share": round(self.loss_share, 6),
                "longest_answer": self.longest_answer}

    def summary(self, max_seq_len: int, truncation: str) -> str:
        """What was cut or dropped, in words ("" when nothing was)."""
        n, limit = f"{self.examples:,}", f"data.max_seq_len {max_seq_len}"
        parts = []
        if self.prompt_cut:
            parts.append(f"{self.prompt_cut:,} of {n} prompts cut from the left to fit {limit}")
        if self.turns_cut:
            parts.append(f"{self.turns_cut:,} of {n} conversations without their earliest exchanges to fit {limit}")
        if self.text_cut:
            parts.append(f"{self.text_cut:,} of {n} texts cut at {limit} (their ends are not trained on)")
        alone = "the last exchange alone" if self.chat else "the answer alone"
        if self.dropped and truncation == "drop":
            parts.append(f"{self.dropped:,} of {n} examples dropped: longer than {limit} (data.truncation: drop)")
        elif self.dropped and parts:
            parts.append(f"{self.dropped:,} dropped ({alone} is longer)")
        elif self.dropped:
            parts.append(f"{self.dropped:,} of {n} examples dropped: {alone} is longer than {limit}")
        return "; ".join(parts)


def tokenize_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                     train_on_prompt: bool, bos: bool, truncation: str = "cut_prompt",
                     chat_template: ChatTemplate | None = None) -> TokenizedExample:
    """Prompt and response tokenized separately and concatenated, EOS last, BOS first when `bos`
    (`bos_first`, which evaluation follows too). A conversation: `tokenize_conversation`.

    Longer than `max_seq_len`: under `cut_prompt` the prompt is cut from the left (a BOS stays first)
    so that the whole response and its EOS survive; an example whose answer alone (BOS, response,
    EOS) does not fit is dropped; an example without a prompt (language modelling) is cut at
    `max_seq_len`. Under `drop` every example that does not fit is dropped."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r} is not one of {TRUNCATIONS}")
    if example.messages is not None:
        if chat_template is None:
            raise ValueError("a conversation needs a chat template")
        return tokenize_conversation(example.messages, tokenizer, renderer(tokenizer, chat_template),
                                     chat_template.origin, max_seq_len, train_on_prompt, bos, truncation)
    [prompt] = encode(tokenizer, [example.prompt], bos)
    [response] = encode(tokenizer, [example.response], bos=False)
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    head = prompt[:1] if bos and prompt[:1] == [tokenizer.bos_token_id] else []
    body = prompt[len(head):]
    length, answer = len(prompt) + len(response), len(head) + len(response)
    outcome = "whole"
    if length > max_seq_len:
        if truncation == "drop" or (body and answer > max_seq_len):
            return TokenizedExample(None, "dropped", length, answer)
        if body:
            prompt = head + body[len(body) - (max_seq_len - answer):]
            outcome = "prompt_cut"
        else:
            outcome = "text_cut"
    labels = (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + response
    item = {"input_ids": (prompt + response)[:max_seq_len], "labels": labels[:max_seq_len]}
    return TokenizedExample(item, outcome, length, answer)


def tokenize_conversation(messages: tuple[Message, ...], tokenizer: PreTrainedTokenizerBase, render: Render,
                          origin: str, max_seq_len: int, train_on_prompt: bool, bos: bool,
                          truncation: str) -> TokenizedExample:
    """The rendered conversation, BOS first when `bos` (unless the template wrote it), the loss on
    each assistant answer and its closing marker (`chat.answer_spans`; everything with
    `train_on_prompt`). No EOS is added: the template closes each turn.

    Longer than `max_seq_len`: under `cut_prompt` whole exchanges are left out, earliest first (the
    system message stays), until it fits; one whose last exchange alone does not fit is dropped.
    Under `drop` every conversation that does not fit is dropped."""
    whole = conversation_item(messages, tokenizer, render, origin, train_on_prompt, bos)
    length = len(whole["input_ids"])
    starts = exchange_starts(messages)
    answer = length if len(starts) == 1 else _rendered_length(without_earliest(messages, starts[-1]), tokenizer,
                                                                render, bos)
    if length <= max_seq_len:
        return TokenizedExample(whole, "whole", length, answer)
    if truncation == "drop" or answer > max_seq_len:
        return TokenizedExample(None, "dropped", length, answer)
    for start in starts[1:]:
        kept = without_earliest(messages, start)
        if start == starts[-1] or _rendered_length(kept, tokenizer, render, bos) <= max_seq_len:
            item = conversation_item(kept, tokenizer, render, origin, train_on_prompt, bos)
            return TokenizedExample(item, "turns_cut", length, answer)
    raise AssertionError("unreachable: the last exchange fits")


def conversation_item(messages: tuple[Message, ...], tokenizer: PreTrainedTokenizerBase, render: Render, origin: str,
                      train_on_prompt: bool, bos: bool) -> dict[str, list[int]]:
    """Token ids and labels of a rendered conversation: a token is trained when its characters
    overlap an answer span (so the token that carries an answer's first characters together with a
    space before them is trained too)."""
    if not tokenizer.is_fast:
        raise UserError("data.format: conversations need a fast tokenizer (its offsets map the answers to tokens); "
                        "this one is a slow (Python) tokenizer")
    text, spans = answer_spans(render, messages, origin)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, k = list(encoded["input_ids"]), [], 0
    for token, (start, end) in zip(ids, encoded["offset_mapping"]):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        trained = train_on_prompt or (k < len(spans) and start < end and spans[k][0] < end)
        labels.append(token if trained else IGNORE_INDEX)
    if needs_bos(tokenizer, text, bos):
        ids, labels = [tokenizer.bos_token_id, *ids], [tokenizer.bos_token_id if train_on_prompt else IGNORE_INDEX,
                                                       *labels]
    return {"input_ids": ids, "labels": labels}


def _rendered_length(messages: tuple[Message, ...], tokenizer: PreTrainedTokenizerBase, render: Render,
                     bos: bool) -> int:
    text = render(messages)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + needs_bos(tokenizer, text, bos)


def tokenize_examples(examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                      train_on_prompt: bool, packing: bool, add_bos: bool | None = None,
                      truncation: str = "cut_prompt", chat_template: ChatTemplate | None = None,
                      ) -> tuple[list[dict[str, list[int]]], TruncationReport]:
    """The items training reads (packed when `packing`) and a report of what truncation did.
    Conversations are rendered by `chat_template`."""
    bos = bos_first(tokenizer, add_bos)
    report = TruncationReport(examples=len(examples), chat=any(e.messages is not None for e in examples))
    items = []
    for example in examples:
        done = tokenize_example(example, tokenizer, max_seq_len, train_on_prompt, bos, truncation, chat_template)
        setattr(report, done.outcome, getattr(report, done.outcome) + 1)
        report.lengths.append(done.length)
        report.longest_answer = max(report.longest_answer, done.answer)
        if done.item is not None:
            items.append(done.item)
    items = pack(items, max_seq_len) if packing else items
    report.tokens = sum(len(item["input_ids"]) for item in items)
    report.loss_tokens = sum(sum(label != IGNORE_INDEX for label in item["labels"][1:]) for item in items)
    return items, report


def check_kept(report: TruncationReport, max_seq_len: int, truncation: str) -> None:
    """A UserError when truncation dropped every training example."""
    if not report.examples or report.kept:
        return
    n = "the one training example is" if report.examples == 1 else f"all {report.examples:,} training examples are"
    if truncation == "drop":
        raise UserError(f"data: {n} longer than data.max_seq_len {max_seq_len}, and data.truncation is drop (the "
                        f"shortest is {min(report.lengths)} tokens, the longest answer {report.longest_answer}); raise "
                        "data.max_seq_len, or set data.truncation: cut_prompt")
    alone, longest = (("the last exchange alone (with the system message, and BOS where sequences begin with it)",
                       "the longest last exchange") if report.chat else
                      ("the answer alone (with EOS, and BOS where sequences begin with it)", "the longest answer"))
    raise UserError(f"data: {n} dropped: {alone} is longer than data.max_seq_len {max_seq_len} ({longest}: "
                    f"{report.longest_answer} tokens); raise data.max_seq_len to at least {report.longest_answer}")


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
