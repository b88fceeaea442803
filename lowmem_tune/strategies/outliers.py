"""Per-layer outlier ratios (OwLore's layer-sampling weights), computed for any Llama-family model.

For every weight W_ij of a decoder layer's linear projections the Wanda score is |W_ij| · ‖X_j‖₂,
where ‖X_j‖₂ is the L2 norm of input column j over all calibration tokens. A layer's outlier ratio
D_l is the share of its scores (all projections together) above M × their mean.

Default M = 13. OwLore's published LLaMA-2-7B ratios (the numbers behind its results, shipped as
`llama2_7b_ratio_13`) use M = 13; OWL's 3-5 was tuned to allocate pruning sparsity, a different
use. Layers differ mainly in how heavy the tail of their score distribution is, and the share above
a threshold separates heavy from light tails more the further out the threshold sits, so a higher
M gives sharper, more informative sampling probabilities. The cost is that scores from random
weights (no trained outliers) rarely pass 13 × mean; the probabilities are smoothed (see
`sampling_probabilities`) so few or no outliers give near-uniform sampling, never p = 0.

Calibration defaults: 32 sequences × 256 tokens (8192 tokens). Collecting the norms is one
no-grad forward pass; on a 7B model in bf16 that adds at most ~0.2 GB of activations on top of the
weights, and the scores are formed one projection at a time (≤ 180 MB in fp32 for 11008×4096), so
it fits a 24 GB card; on CPU a tiny model takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from lowmem_tune.atomic import write_json_atomic
from lowmem_tune.cache import cache_entry, tensors_fingerprint
from lowmem_tune.errors import UserError
from lowmem_tune.layers import decoder_layers, dense_weight, layer_linears

DEFAULT_THRESHOLD = 13.0
RANDOM_TOKENS_NOTE = "random token ids (no tokenizer for this model)"


@dataclass
class OutlierRatios:
    """Outlier counts per decoder layer, with what they were computed from."""

    outliers: list[int]
    """Scores above threshold x the layer's mean, per layer."""
    weights: list[int]
    """Scored weights per layer (all its linear projections)."""
    threshold: float
    calibration: str
    """Where the calibration tokens came from (for humans)."""
    tokens: int
    calibration_hash: str
    """sha256 of the calibration token ids: part of the cache key."""

    @property
    def ratios(self) -> list[float]:
        """D_l: the share of the layer's weights that are outliers."""
        return [o / w for o, w in zip(self.outliers, self.weights)]


# --------------------------------------------------------------------------- computing


@torch.no_grad()
def input_column_norms(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """‖X_j‖₂ for every input column of every decoder-layer linear, from one no-grad pass.

    Keys are (layer index, projection name). Sums of squares accumulate in fp32 on the weights'
    device, so bf16 activations do not lose the small columns.
    """
    sums: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook_for(key: tuple[int, str]):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            squares = (x * x).sum(dim=0)
            sums[key] = sums[key] + squares if key in sums else squares

        return hook

    for index, layer in enumerate(decoder_layers(model)):
        for name, linear in layer_linears(layer).items():
            handles.append(linear.register_forward_hook(hook_for((index, name))))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for input_ids in batches:
            model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not sums:
        raise UserError("outlier ratios: the calibration data gave no tokens (empty file or zero samples)")
    return {key: value.sqrt() for key, value in sums.items()}


@torch.no_grad()
def layer_outlier_counts(model: nn.Module, norms: dict[tuple[int, str], torch.Tensor],
                         threshold: float) -> tuple[list[int], list[int]]:
    """Per layer: how many Wanda scores |W_ij|·‖X_j‖ exceed threshold × the layer's mean score,
    and how many weights were scored.

    Two passes over the layer's projections (sum, then count) so only one projection's scores
    exist at a time, never the concatenation of all seven.
    """
    outliers, weights = [], []
    for index, layer in enumerate(decoder_layers(model)):
        linears = layer_linears(layer)

        def scores(name: str) -> torch.Tensor:
            return dense_weight(linears[name]).detach().float().abs() * norms[(index, name)].unsqueeze(0)

        total = sum(scores(name).sum().item() for name in linears)
        count = sum(linears[name].weight.numel() for name in linears)
        cut = threshold * total / count
        outliers.append(int(sum((scores(name) > cut).sum().item() for name in linears)))
        weights.append(count)
    return outliers, weights


def sampling_probabilities(result: OutlierRatios, temperature: float = 1.0) -> list[float]:
    """p_l ∝ D̂_l^(1/temperature) with D̂_l = (outliers_l + 1) / (weights_l + 2).

    D̂ is the posterior mean of the outlier share under a uniform prior (add-one smoothing). On a
    pretrained 7B model every layer has tens of thousands of outliers at M = 13 and the +1 moves
    p_l by less than 1e-4; on a small model with a handful of outliers it keeps a layer in which
    none was seen from getting p = 0 (never trained) and three stray weights from claiming most
    of the samples. With no outliers anywhere (random weights) it is uniform.
    """
    shares = [(o + 1) / (w + 2) for o, w in zip(result.outliers, result.weights)]
    weights = torch.tensor(shares, dtype=torch.float64) ** (1.0 / temperature)
    return (weights / weights.sum()).tolist()


# --------------------------------------------------------------------------- calibration data


def token_hash(batches: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(str(tuple(batch.shape)).encode())
        digest.update(batch.to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()


def chunk_tokens(ids: list[int], samples: int, seq_len: int) -> list[torch.Tensor]:
    """Cut a token stream into at most `samples` sequences of `seq_len`, one batch of rows each 8."""
    rows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
    if not rows:
        raise UserError(f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}: "
                        "use more text or a smaller calibration_seq_len / --seq-len")
    table = torch.tensor(rows, dtype=torch.long)
    return list(table.split(8))


def text_batches(text: str, tokenizer, samples: int, seq_len: int) -> list[torch.Tensor]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return chunk_tokens(list(ids), samples, seq_len)


def random_token_batches(vocab_size: int, samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """Fallback for models with no tokenizer (tiny random catalog models): uniform random ids."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab_size, (samples, seq_len), generator=generator)
    return list(table.split(8))


def synthetic_text(samples: int, seq_len: int) -> str:
    """Enough generated synthetic-boolq prose for `samples` × `seq_len` tokens (≥ 1 char per token)."""
    from lowmem_tune.data.synthetic import generate_synthetic_boolq

    rows = generate_synthetic_boolq("train", max(1, samples * seq_len // 60 + 1), seed=1)
    return "\n\n".join(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer: {'yes' if r['answer'] else 'no'}"
                       for r in rows)


def load_tokenizer(pretrained_path: str | None, tokenizer_name: str | None = None):
    """The model's tokenizer, or None where it has none (calibration then uses random tokens)."""
    from lowmem_tune.modeling import load_tokenizer as load

    source = tokenizer_name or pretrained_path
    if source is None:
        return None
    try:
        return load(source)
    except UserError:
        return None


def read_calibration_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file not found: {path} (give a plain-text file)")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise UserError(f"calibration file {path} is empty")
    return text


# --------------------------------------------------------------------------- caching


def load_cached(path: Path) -> OutlierRatios | None:
    try:
        return OutlierRatios(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None




def compute_outlier_ratios(model: nn.Module, batches: list[torch.Tensor], threshold: float, calibration: str,
                           cache_dir: Path | None = None) -> tuple[OutlierRatios, bool]:
    """D_l for every decoder layer, read from / written to the cache (when there is one) under the
    model's weights, the calibration token ids and M. Returns (ratios, cache_hit)."""
    digest = token_hash(batches)
    path = None
    if cache_dir is not None:
        path = cache_entry(cache_dir, "outliers", tensors_fingerprint(model.state_dict()), ".json",
                           calibration=digest, threshold=threshold)
        if (cached := load_cached(path)) is not None:
            return cached, True
    norms = input_column_norms(model, batches)
    outliers, weights = layer_outlier_counts(model, norms, threshold)
    result = OutlierRatios(
        outliers=outliers,
        weights=weights,
        threshold=threshold,
        calibration=calibration,
        tokens=sum(b.numel() for b in batches),
        calibration_hash=digest,
    )
    if path is not None:
        write_json_atomic(path, asdict(result))
    return result, False
