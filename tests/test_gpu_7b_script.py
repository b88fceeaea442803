"""benchmarks/gpu_7b.py off the GPU: its OOM classification and one child run on the CPU, including
the two ways an out-of-memory error reaches it (inside the training loop, and during setup)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import lowmem_tune.train.run as run

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_7b.py"


@pytest.fixture(scope="module")
def gpu_7b():
    spec = importlib.util.spec_from_file_location("gpu_7b", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_7b"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_7b"]


def _run(gpu_7b, tmp_path: Path, strategy: str = "galore") -> dict:
    config = gpu_7b.BenchConfig(strategy, 64, capped=False, knobs={"name": strategy, "rank": 8})
    return gpu_7b.run_config(config, "tiny-llama", "cpu", steps=3, warmup=1, accumulation=1, cap_bytes=None,
                             workdir=tmp_path)


def test_out_of_memory_messages_are_recognized(gpu_7b):
    assert gpu_7b.is_out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert gpu_7b.is_out_of_memory("torch.OutOfMemoryError: CUDA error")
    assert not gpu_7b.is_out_of_memory("loss became nan at step 3; lower train.lr or check the data")


def test_one_config_runs_and_is_measured(gpu_7b, tmp_path):
    result = _run(gpu_7b, tmp_path)
    assert result["status"] == "completed" and result["fits"] is True
    assert result["steps_done"] == 3 and result["tokens_per_s"] > 0
    assert result["planned_bytes"] > 0 and result["peak_rss_bytes"] > 0


def test_oom_in_the_training_loop_is_a_result(gpu_7b, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(run, "lr_at", out_of_memory)  # called inside the loop, after the backward
    result = _run(gpu_7b, tmp_path)
    assert result["status"] == "oom" and result["fits"] is False and result["steps_done"] == 0


def test_oom_during_setup_is_a_result(gpu_7b, tmp_path, monkeypatch):
    def out_of_memory(model):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.00 GiB")

    monkeypatch.setattr(run, "enable_activation_checkpointing", out_of_memory)
    result = _run(gpu_7b, tmp_path)
    assert result["status"] == "oom" and result["fits"] is False and "out of memory" in result["message"]


def test_must_show_reads_the_rows(gpu_7b):
    rows = [
        {"id": "galore-512", "fits": True, "peak_allocated_bytes": 17 * 10**9},
        {"id": "owlore-512", "fits": False, "peak_allocated_bytes": None},
        {"id": "galore-512-uncapped", "tokens_per_s": 900.0},
        {"id": "adamw8bit-512-uncapped", "tokens_per_s": 1000.0},
        {"id": "galore-int8-512", "fits": True, "peak_allocated_bytes": 11 * 10**9},
        {"id": "welore-int8-512", "fits": True, "peak_allocated_bytes": 6 * 2**30},
        {"id": "apollo-mini-int8-512", "fits": True, "peak_allocated_bytes": 9 * 2**30 + 1},
        {"id": "qlora-512", "fits": True, "peak_allocated_bytes": 9 * 10**9},
    ]
    held = [h for _, h, _ in gpu_7b.must_show(rows)]
    # the GaLore INT8 row is over its 10 GB, the APOLLO-Mini one a byte over its 9 GiB
    assert held == [True, False, False, True, False, True, True]
    assert [h for _, h, _ in gpu_7b.must_show(rows[:1])] == [True, None, None, None, None, None, None]
    rows[5]["peak_allocated_bytes"] = 7 * 2**30  # over the 6.27 GiB an 8 GiB card leaves
    assert [h for _, h, _ in gpu_7b.must_show(rows)][3] is False


def test_cpu_smoke_children_import_the_checkouts_package_without_an_install(tmp_path):
    """A copy of the checkout, run with PYTHONPATH unset: the child must import the copy's package
    (what it does on a GPU machine where nothing is installed), and report both tokens/s."""
    import json
    import os
    import shutil
    import subprocess

    root = SCRIPT.parent.parent
    checkout = tmp_path / "checkout"
    for part in ("lowmem_tune", "profiles", "evaluate"):
        shutil.copytree(root / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / "benchmarks").mkdir()
    shutil.copy(SCRIPT, checkout / "benchmarks" / SCRIPT.name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(checkout / "benchmarks" / SCRIPT.name), "--cpu-smoke", "--only",
                           "galore-128"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = next(line for line in done.stdout.splitlines() if line.startswith("results: ")).split()[1].rstrip(",")
    (row,) = json.loads(Path(results).read_text())["rows"]
    assert row["status"] == "completed", row
    assert Path(row["package"]) == (checkout / "lowmem_tune").resolve()
    assert row["tokens_per_s"] > 0 and row["tokens_per_s_all"] > 0 and 0 <= row["refresh_share"] < 1
