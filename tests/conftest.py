"""Shared test fixtures: everything offline, tiny models, temporary caches."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own lowmem-tune cache so caching tests cannot leak into each other."""
    monkeypatch.setenv("LOWMEM_TUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
