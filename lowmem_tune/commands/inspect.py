"""`lowmem-tune inspect outliers`: a model's per-layer outlier ratios and the sampling
probabilities OwLore would give them."""

from __future__ import annotations

from pathlib import Path

import torch

from lowmem_tune.commands import working
from lowmem_tune.errors import UserError
from lowmem_tune.strategies.outliers import (
    RANDOM_TOKENS_NOTE,
    OutlierRatios,
    compute_outlier_ratios,
    load_tokenizer,
    random_token_batches,
    read_calibration_file,
    sampling_probabilities,
    synthetic_text,
    text_batches,
)


def _calibration_for_inspect(resolved, calibration_file: Path | None, samples: int,
                             seq_len: int) -> tuple[list[torch.Tensor], str]:
    tokenizer = load_tokenizer(resolved.pretrained_path)
    if tokenizer is None:
        if calibration_file is not None:
            raise UserError(f"--calibration-file needs a tokenizer, and model {resolved.name!r} has none "
                            "(give a model directory with tokenizer files)")
        vocab = resolved.config.vocab_size
        return random_token_batches(vocab, samples, seq_len), RANDOM_TOKENS_NOTE
    if calibration_file is not None:
        return text_batches(read_calibration_file(calibration_file), tokenizer, samples, seq_len), str(calibration_file)
    return text_batches(synthetic_text(samples, seq_len), tokenizer, samples, seq_len), "generated synthetic-boolq text"


def render_outlier_chart(result: OutlierRatios, probabilities: list[float], title: str):
    """A rich Table: one row per layer, ratio, sampling probability and a bar of the probability."""
    from rich.table import Table

    table = Table(title=title, caption=f"M = {result.threshold:g}, {result.tokens} calibration tokens "
                                       f"({result.calibration})")
    table.add_column("layer", justify="right")
    table.add_column("outlier ratio", justify="right")
    table.add_column("p(sample)", justify="right")
    table.add_column("", justify="left")
    width = 40
    top = max(probabilities)
    for index, (ratio, prob) in enumerate(zip(result.ratios, probabilities)):
        bar = "█" * max(1 if prob > 0 else 0, round(width * prob / top)) if top > 0 else ""
        table.add_row(str(index), f"{100 * ratio:.4f}%", f"{prob:.3f}", bar)
    return table


def inspect_outliers_command(model: str, calibration_file: Path | None, samples: int, seq_len: int,
                             threshold: float, device: str) -> None:
    from rich.console import Console

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import load_model, pick_device, quiet_library_progress, resolve_dtype
    from lowmem_tune.resources import cache_dir

    quiet_library_progress()  # a "Loading weights" bar above the table is noise
    if threshold <= 1:
        raise UserError(f"--threshold is M in 'score > M x mean'; must be above 1, got {threshold}")
    if samples <= 0 or seq_len <= 0:
        raise UserError("--samples and --seq-len must be at least 1")
    console = Console()
    resolved = resolve_model(model)
    torch_device = pick_device(device)
    random_weights = resolved.pretrained_path is None
    with working(f"loading {resolved.name}"):
        loaded = load_model(resolved, "random" if random_weights else "pretrained",
                            resolve_dtype("auto", torch_device), torch_device)
    batches, source = _calibration_for_inspect(resolved, calibration_file, samples, seq_len)
    result, hit = compute_outlier_ratios(loaded, batches, threshold, source, cache_dir())
    probabilities = sampling_probabilities(result)
    title = f"Outlier ratios of {resolved.name}" + (" (random weights)" if random_weights else "")
    console.print(render_outlier_chart(result, probabilities, title))
    if hit:
        console.print("[dim]read from the cache[/dim]")
    if not any(result.outliers):
        console.print(f"no layer has a score above {threshold:g} x its mean: OwLore would sample uniformly (as LISA)")
