"""The shipped architecture summaries agree with models built from each catalog config."""

from __future__ import annotations

import os

import pytest

from lowmem_tune.catalog import CATALOG, count_parameters, resolve_model
from lowmem_tune.errors import UserError
from lowmem_tune.planner.architecture import catalog_shapes, resolve_architecture, spec_fingerprint, summarize

SHAPES = catalog_shapes()


def test_llama2_7b_parameter_count():
    assert resolve_architecture("llama-2-7b").params == 6_738_415_616


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_shipped_summary_matches_a_meta_build(name):
    spec = CATALOG[name]
    config = spec.build_config()
    assert SHAPES[name]["fingerprint"] == spec_fingerprint(spec), "regenerate: python -m lowmem_tune.planner.architecture"
    shipped = resolve_architecture(name)
    assert shipped.params == count_parameters(config)
    assert shipped == summarize(name, config)


def test_model_revision_reads_config_weights_and_tokenizer_at_that_revision(tmp_path):
    """A hub repository cached offline with two revisions (the layout huggingface_hub reads:
    refs/NAME holds a commit, snapshots/COMMIT the files): `model.revision: v1` loads v1's config,
    weights and tokenizer, not main's."""
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    from lowmem_tune.data import train_local_tokenizer

    repo = tmp_path / "hf" / "hub" / "models--someone--tiny"
    for commit, (name, seed, words) in enumerate([("main", 0, "red box"), ("v1", 1, "blue cup")]):
        torch.manual_seed(seed)
        snapshot = repo / "snapshots" / f"{commit:040x}"
        AutoModelForCausalLM.from_config(resolve_model("tiny-llama").config).save_pretrained(snapshot)
        tokenizer = train_local_tokenizer([f"the {words} holds three coins"] * 20, 120)
        tokenizer.add_special_tokens({"additional_special_tokens": [f"<{name}>"]})
        tokenizer.save_pretrained(snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(f"{commit:040x}")
    expected = AutoModelForCausalLM.from_pretrained(repo / "snapshots" / f"{1:040x}").lm_head.weight
    script = (
        "import sys, torch\n"
        "from lowmem_tune.catalog import resolve_model\n"
        "from lowmem_tune.modeling import load_model, load_tokenizer\n"
        "resolved = resolve_model('someone/tiny', 'v1')\n"
        "model = load_model(resolved, 'pretrained', torch.float32, torch.device('cpu'))\n"
        "torch.save(model.lm_head.weight, sys.argv[1])\n"
        "vocab = load_tokenizer(resolved.pretrained_path, resolved.revision).get_vocab()\n"
        "print('<v1>' in vocab, '<main>' in vocab)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.pt")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "w.pt"), expected)
    assert done.stdout.split()[-2:] == ["True", "False"]  # v1's tokenizer, not main's


def test_a_revision_for_a_local_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="only a hub id"):
        resolve_model(str(tmp_path), "v1")
