"""Singular values of the decoder matrices: float32 SVD (GPU when there is one), cached on disk.

The cache file is keyed by the decoder matrices themselves (`lowmem_tune.cache`), so a second run
on the same model is a file read, and a changed model can never pick up stale spectra. Hashing
reads the weights once; it is far cheaper than the SVDs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowmem_tune.atomic import atomic_file
from lowmem_tune.cache import cache_entry, tensors_fingerprint
from lowmem_tune.compress.ranks import decoder_matrices

SPECTRA_DIR = "welore-spectra"


def weights_fingerprint(model: nn.Module) -> str:
    """A content hash of the decoder matrices (what the spectra depend on)."""
    return tensors_fingerprint({name: linear.weight for name, linear in decoder_matrices(model).items()})


def singular_values(model: nn.Module, cache_dir: Path, device: torch.device | None = None,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Descending float32 singular values of every decoder matrix, by module name (on the CPU)."""
    path = cache_entry(cache_dir, SPECTRA_DIR, weights_fingerprint(model), ".safetensors")
    if path.is_file():
        return load_file(str(path))
    spectra = compute_singular_values(model, device, progress)
    _save_atomic(spectra, path)
    return spectra


def compute_singular_values(model: nn.Module, device: torch.device | None = None,
                            progress: bool = True) -> dict[str, torch.Tensor]:
    from rich.console import Console
    from rich.progress import track

    linears = decoder_matrices(model)
    svd_device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    spectra = {}
    for name, linear in track(list(linears.items()), description="SVD of decoder matrices",
                              disable=not progress, console=Console(stderr=True), transient=True):
        work = linear.weight.detach().to(device=svd_device, dtype=torch.float32)
        spectra[name] = torch.linalg.svdvals(work).cpu()
    return spectra


def _save_atomic(spectra: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in spectra.items()}, str(tmp))
