"""What a run needs before its first step: the output directory checked, the data tokenized and
batched, the tokenizer, the model's identity for caches, and quiet libraries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from transformers import PreTrainedTokenizerBase

from lowmem_tune.atomic import atomic_directory, remove_interrupted
from lowmem_tune.catalog import ResolvedModel
from lowmem_tune.data import (
    BatchStream,
    Example,
    TruncationReport,
    load_examples_and_format,
    split_heldout,
    tokenize_examples,
    train_local_tokenizer,
)
from lowmem_tune.data.chat import CHAT_FORMATS, ChatTemplate, chat_template_for, corpus_renderer
from lowmem_tune.data.tokenize import bos_first, check_kept
from lowmem_tune.errors import UserError, one_line
from lowmem_tune.modeling import load_tokenizer
from lowmem_tune.profile import DataSection, Profile
from lowmem_tune.train.checkpoint import CheckpointInfo, latest_checkpoint

LOCAL_TOKENIZER_VOCAB = 512


@dataclass
class TokenizedData:
    """The data as a run sees it before its first batch: what `run` trains on and `lowmem-tune data`
    shows, computed by the one function `tokenize_data`."""

    dataset: str
    format: str
    train_examples: list[Example]
    heldout_examples: list[Example]
    tokenizer: PreTrainedTokenizerBase
    tokenizer_source: str
    """Where the tokenizer comes from, in words."""
    bos: bool
    """Whether every sequence begins with BOS (`bos_first`)."""
    pad_id: int
    train_items: list[Any]
    heldout_items: list[Any]
    train_report: TruncationReport
    heldout_report: TruncationReport
    chat_template: ChatTemplate | None = None
    """The template conversations are rendered with (chat formats only)."""

    def truncation_note(self, data: DataSection) -> str | None:
        """One line saying what truncation cut or dropped; None when it did nothing."""
        parts = [f"{what}{report.summary(data.max_seq_len, data.truncation)}"
                 for what, report in (("", self.train_report), ("held-out: ", self.heldout_report)) if report.changed]
        return "data: " + "; ".join(parts) if parts else None


@dataclass
class RunData:
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    train_items: list[Any]
    heldout_items: list[Any]
    stream: BatchStream
    truncation_note: str | None = None
    """What truncation cut or dropped (the run says it once at start); None when nothing."""


def tokenize_data(profile: Profile, resolved: ResolvedModel, run_dir: Path, main: bool = True) -> TokenizedData:
    """Examples loaded, rendered and split, the tokenizer (`tokenizer_and_source`), and the tokenized items
    under the profile's truncation, BOS and packing policies. Only the `main` process writes (a
    tokenizer trained for a random-init model)."""
    d = profile.data
    examples, fmt = load_examples_and_format(d)
    train_examples, heldout_examples = split_heldout(examples, d.heldout, profile.train.seed)
    chat = fmt in CHAT_FORMATS
    tokenizer, source = tokenizer_and_source(profile, resolved, run_dir, _corpus(train_examples, d, chat), main)
    template = chat_template_for(d.chat_template, tokenizer) if chat else None
    if template is not None:  # the tokenizer saved with the model renders conversations as training did
        tokenizer.chat_template = template.source
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    (train_items, train_report), (heldout_items, heldout_report) = (
        tokenize_examples(exs, tokenizer, d.max_seq_len, d.train_on_prompt, d.packing, profile.eval.add_bos,
                          d.truncation, template)
        for exs in (train_examples, heldout_examples)
    )
    return TokenizedData(d.dataset, fmt, train_examples, heldout_examples, tokenizer, source,
                         bos_first(tokenizer, profile.eval.add_bos), pad_id, train_items, heldout_items, train_report,
                         heldout_report, template)


def _corpus(examples: list[Example], data: DataSection, chat: bool) -> Iterator[str]:
    """The texts a random-init model's tokenizer is trained on (generated only when one is): a
    conversation as the template that will render it writes it (that tokenizer has no template of
    its own, so data.chat_template or the default)."""
    render = corpus_renderer(chat_template_for(data.chat_template, None)) if chat else None
    for example in examples:
        yield render(example.messages) if render and example.messages else example.prompt + example.response


def prepare_data(profile: Profile, resolved: ResolvedModel, run_dir: Path, processes: int = 1,
                 main: bool = True) -> RunData:
    """`tokenize_data`, checked to leave enough to train on, and the seeded batch stream of global
    micro-batches (micro batch size x `processes` rows). Only the `main` process writes."""
    data = tokenize_data(profile, resolved, run_dir, main)
    check_kept(data.train_report, profile.data.max_seq_len, profile.data.truncation)
    train_items = data.train_items
    rows = profile.train.micro_batch_size * processes
    if len(train_items) < rows:
        dropped = data.train_report.dropped
        after = f" (after {dropped:,} dropped by data.truncation)" if dropped else ""
        raise UserError(
            f"data: {len(train_items)} training examples{after} are fewer than train.micro_batch_size "
            f"({profile.train.micro_batch_size}) x {processes} process(es); lower the batch or add data"
        )
    stream = BatchStream(train_items, rows, profile.train.seed, profile.data.shuffle, data.pad_id)
    return RunData(data.tokenizer, data.pad_id, train_items, data.heldout_items, stream,
                   data.truncation_note(profile.data))


def tokenizer_and_source(profile: Profile, resolved: ResolvedModel, run_dir: Path, texts: Iterable[str],
                         main: bool = True) -> tuple[PreTrainedTokenizerBase, str]:
    """The model's tokenizer and where it came from, in words. A random-init model without one gets a
    small tokenizer trained on the run's data, saved in the run directory (by the main process,
    whole or not at all) so a resumed run uses the very same one; every process trains the same one
    from the same data."""
    source = profile.model.tokenizer or (resolved.pretrained_path if profile.model.init == "pretrained" else None)
    if source is not None:
        tokenizer = load_tokenizer(source, resolved.revision if source == resolved.pretrained_path else None)
        described = str(source)
    else:
        saved = run_dir / "tokenizer"
        if (saved / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(str(saved))
            described = f"{_shown(saved)} (trained on the data when the run in output.dir began)"
        else:
            vocab = min(LOCAL_TOKENIZER_VOCAB, resolved.config.vocab_size)
            tokenizer = train_local_tokenizer(texts, vocab)
            described = f"byte-level BPE trained on the training examples (model.init: random; at most {vocab} tokens)"
            if main:
                with atomic_directory(saved) as tmp:
                    tokenizer.save_pretrained(tmp)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > resolved.config.vocab_size:
        raise UserError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {resolved.config.vocab_size}"
        )
    return tokenizer, described


def _shown(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() and len(text) <= 120 else repr(text)[:120] + "…"


def check_run_dir(run_dir: Path) -> None:
    """output.dir names a directory that is there or can be made: not a file, not below a file,
    not a name the file system refuses (too long, ...)."""
    shown = _shown(run_dir)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"output.dir {shown} is a file, not a directory; choose another output.dir")
        blocking = next((p for p in run_dir.absolute().parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise UserError(f"output.dir {shown}: {blocking} is a file, so no directory can be made below it; "
                            "choose another output.dir")
    except OSError as err:
        raise UserError(f"output.dir {shown}: not usable as a directory ({err.strerror or one_line(err)}); "
                        "choose another output.dir") from None


def checkpoint_to_resume(run_dir: Path, resume: bool) -> CheckpointInfo | None:
    """The checkpoint `--resume` continues from; refuses to start over a run that exists."""
    check_run_dir(run_dir)
    checkpoints_dir = run_dir / "checkpoints"
    try:
        remove_interrupted(run_dir)  # a final/ being replaced
        remove_interrupted(checkpoints_dir)
        latest = latest_checkpoint(checkpoints_dir)
    except OSError as err:
        raise UserError(f"output.dir {_shown(run_dir)}: cannot read it ({err.strerror or one_line(err)}); choose "
                        "another output.dir") from None
    if resume:
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {checkpoints_dir} (start without --resume)")
        return latest
    if latest is not None or (run_dir / "final").exists():
        raise UserError(
            f"output.dir {run_dir} already holds a run; continue it with --resume, or choose another "
            "output.dir (--set output.dir=...)"
        )
    return None
