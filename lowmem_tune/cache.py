"""What is derived from a model's weights and kept on disk between runs (singular values, outlier
ratios, compressed models), under one kind of key: a hash of the tensors it was computed from and
the settings that shaped it. A name or a revision cannot say whether a folder's weights changed
since; their bytes can, so an edited model never meets a stale entry, and the same weights under
another path find theirs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
    digest.update(memoryview(data))  # hashlib releases the GIL here, so threads hash in parallel
    return digest.digest()


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of `tensors` (in their order)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: _tensor_digest(*item), tensors.items()))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def cache_entry(cache_dir: Path, kind: str, fingerprint: str, suffix: str = "", **settings: object) -> Path:
    """Where the `kind` result for weights `fingerprint` computed with `settings` is kept."""
    key = fingerprint[:32]
    if settings:
        shaped = "|".join(f"{name}={value!r}" for name, value in sorted(settings.items()))
        key += "-" + hashlib.sha256(shaped.encode()).hexdigest()[:16]
    return Path(cache_dir) / kind / f"{key}{suffix}"
