"""`lowmem-tune compress` and `lowmem-tune merge`: load, compress or merge, write atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from lowmem_tune.atomic import atomic_directory
from lowmem_tune.catalog import resolve_model
from lowmem_tune.commands import working
from lowmem_tune.compress import (
    compress_model,
    compressed_ranks,
    load_compressed,
    save_compressed,
    save_merged,
)
from lowmem_tune.errors import UserError
from lowmem_tune.modeling import load_model, load_tokenizer, pick_device, quiet_library_progress
from lowmem_tune.resources import cache_dir


def _save_tokenizer(source: str, out_dir: Path) -> None:
    """The source model's tokenizer (a directory's files, a GGUF file's vocabulary) beside the
    written model, when it has one: a model without one compresses all the same."""
    try:
        tokenizer = load_tokenizer(source)
    except UserError:
        return
    tokenizer.save_pretrained(out_dir)


def _stored_dtype(config) -> torch.dtype:
    """The dtype the checkpoint was saved in (float32 when the config does not say)."""
    stored = getattr(config, "dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    if isinstance(stored, str) and isinstance(getattr(torch, stored, None), torch.dtype):
        return getattr(torch, stored)
    return torch.float32


def _refuse_non_empty(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"-o {output} already exists and is not empty; choose another directory or remove it")


def compress_command(model: str, rank_reduction: float, min_ratio: float, output: Path, merge: bool,
                     device: str) -> None:
    from rich.console import Console

    quiet_library_progress()
    if not 0 < rank_reduction < 1:
        raise UserError(f"--rank-reduction must be between 0 and 1 (e.g. 0.5), got {rank_reduction}")
    if not 0 < min_ratio < 1:
        raise UserError(f"--min-ratio must be between 0 and 1, got {min_ratio}")
    resolved = resolve_model(model)
    if resolved.pretrained_path is None:
        raise UserError(
            f"{model!r} is an architecture without weights; compress needs a trained model "
            "(a local model directory such as a run's final/, or a hub id)"
        )
    if compressed_ranks(resolved.config) is not None:
        raise UserError(f"{model} is already WeLore-compressed; `lowmem-tune merge` turns it back into a dense model")
    svd_device = pick_device(device)
    console = Console(stderr=True)
    # Weights stay on the CPU; each matrix visits the GPU for its SVD, so a 7B model compresses on a 16 GB card.
    with working(f"loading {resolved.name}"):
        dense = load_model(resolved, "pretrained", _stored_dtype(resolved.config), torch.device("cpu"))
    plan = compress_model(dense, rank_reduction, min_ratio, cache_dir(), svd_device)
    _refuse_non_empty(Path(output))
    with atomic_directory(output) as tmp:
        if merge:
            save_merged(dense, tmp)
        else:
            save_compressed(dense, plan, tmp)
        _save_tokenizer(resolved.pretrained_path, tmp)
    s = plan.summary()
    console.print(
        f"ERR {s['rank_reduction_achieved']:.4f} (target {rank_reduction}), τ={plan.tau:.4f}: "
        f"{plan.lrc_count} LRC, {plan.nlrc_count} N-LRC, decoder parameters -{s['decoder_parameter_reduction']:.1%}"
    )
    console.print(f"{'dense (merged)' if merge else 'compressed'} model written to {output}")


def merge_command(model: str, output: Path) -> None:
    """A compressed directory (e.g. a welore run's final/) → a plain dense transformers model."""
    from rich.console import Console

    quiet_library_progress()
    source = Path(model)
    if not (source / "config.json").is_file():
        raise UserError(f"{model}: not a model directory (no config.json)")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    if compressed_ranks(config) is None:
        raise UserError(f"{model} is not WeLore-compressed (no `welore` ranks in config.json); nothing to merge")
    compressed = load_compressed(source, _stored_dtype(config), torch.device("cpu"))
    _refuse_non_empty(Path(output))
    with atomic_directory(output) as tmp:
        merged = save_merged(compressed, tmp)
        _save_tokenizer(str(source), tmp)
    Console(stderr=True).print(f"merged {merged} low-rank matrices; dense model written to {output}")
