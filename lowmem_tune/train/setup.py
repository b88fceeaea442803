"""What a run needs before its first step: the output directory checked, the data tokenized and
batched, the tokenizer, the model's identity for caches, and quiet libraries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from lowmem_tune.atomic import atomic_directory, remove_interrupted
from lowmem_tune.catalog import ResolvedModel
from lowmem_tune.data import BatchStream, load_examples, split_heldout, tokenize_examples, train_local_tokenizer
from lowmem_tune.errors import UserError, one_line
from lowmem_tune.modeling import load_tokenizer
from lowmem_tune.profile import Profile
from lowmem_tune.train.checkpoint import CheckpointInfo, latest_checkpoint

LOCAL_TOKENIZER_VOCAB = 512


@dataclass
class RunData:
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    train_items: list[Any]
    heldout_items: list[Any]
    stream: BatchStream


def prepare_data(profile: Profile, resolved: ResolvedModel, run_dir: Path, processes: int = 1,
                 main: bool = True) -> RunData:
    """Examples loaded and split, the tokenizer, tokenized items and the seeded batch stream of
    global micro-batches (micro batch size x `processes` rows). Only the `main` process writes."""
    examples = load_examples(profile.data)
    train_examples, heldout_examples = split_heldout(examples, profile.data.heldout, profile.train.seed)
    tokenizer = tokenizer_for(profile, resolved, run_dir, [e.prompt + e.response for e in train_examples], main)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_items, heldout_items = (
        tokenize_examples(exs, tokenizer, profile.data.max_seq_len, profile.data.train_on_prompt, profile.data.packing,
                          profile.eval.add_bos)
        for exs in (train_examples, heldout_examples)
    )
    rows = profile.train.micro_batch_size * processes
    if len(train_items) < rows:
        raise UserError(
            f"data: {len(train_items)} training examples are fewer than train.micro_batch_size "
            f"({profile.train.micro_batch_size}) x {processes} process(es); lower the batch or add data"
        )
    stream = BatchStream(train_items, rows, profile.train.seed, profile.data.shuffle, pad_id)
    return RunData(tokenizer, pad_id, train_items, heldout_items, stream)


def tokenizer_for(profile: Profile, resolved: ResolvedModel, run_dir: Path, texts: list[str],
                  main: bool = True) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a random-init model without one gets a small tokenizer trained on the
    run's data, saved in the run directory (by the main process, whole or not at all) so a resumed
    run uses the very same one. Every process trains the same one from the same data."""
    source = profile.model.tokenizer or (resolved.pretrained_path if profile.model.init == "pretrained" else None)
    if source is not None:
        tokenizer = load_tokenizer(source, resolved.revision if source == resolved.pretrained_path else None)
    else:
        saved = run_dir / "tokenizer"
        if (saved / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(str(saved))
        else:
            vocab = min(LOCAL_TOKENIZER_VOCAB, resolved.config.vocab_size)
            tokenizer = train_local_tokenizer(texts, vocab)
            if main:
                with atomic_directory(saved) as tmp:
                    tokenizer.save_pretrained(tmp)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > resolved.config.vocab_size:
        raise UserError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {resolved.config.vocab_size}"
        )
    return tokenizer


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
