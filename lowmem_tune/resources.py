"""Locations of the files shipped with the package: ready profiles, evaluation task cards and chat
templates."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def _shipped_dir(package: str, checkout_dir: str) -> Path:
    # In a source checkout (editable install) the top-level folder is the one users edit;
    # in an installed wheel the same files live inside the package.
    checkout = Path(__file__).resolve().parent.parent / checkout_dir
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files(package)))


def cache_dir() -> Path:
    """$LOWMEM_TUNE_CACHE, else ~/.cache/lowmem-tune (SVD spectra, outlier ratios)."""
    return Path(os.environ.get("LOWMEM_TUNE_CACHE", Path.home() / ".cache" / "lowmem-tune"))


def profiles_dir() -> Path:
    return _shipped_dir("lowmem_tune._profiles", "profiles")


def evaluate_dir() -> Path:
    return _shipped_dir("lowmem_tune._evaluate", "evaluate")


def chat_templates_dir() -> Path:
    """The shipped chat templates (`data.chat_template` names them): NAME.jinja each."""
    return Path(__file__).resolve().parent / "data" / "chat_templates"


def chat_template_names() -> list[str]:
    return sorted(p.stem for p in chat_templates_dir().glob("*.jinja"))
