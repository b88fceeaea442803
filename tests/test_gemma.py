"""Gemma 3 through every strategy: a tiny Gemma-3-architecture model (tied embeddings, sliding-
window and global layers, embeddings scaled by sqrt(hidden), a tokenizer that puts BOS first)
saved as a pretrained directory; each strategy trains it with activation checkpointing, stops,
resumes bit-identically, keeps its embeddings tied, and writes a final model that plain
transformers loads with the logits the run ended with."""

from __future__ import annotations

import pytest
import torch
from test_eval_support import with_bos
from transformers import AutoModelForCausalLM

from lowmem_tune.catalog import resolve_model
from lowmem_tune.data import generate_synthetic_boolq, train_local_tokenizer
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train import RunControl
from lowmem_tune.train.run import TrainingRun
from tests.test_train import Recorder, StopAfter, losses, tiny_profile

STRATEGIES = {
    "full": {"name": "full"},
    "adamw8bit": {"name": "adamw8bit"},
    "galore": {"name": "galore", "rank": 8, "update_proj_gap": 2},
    "galore-int8": {"name": "galore", "rank": 8, "update_proj_gap": 2, "weight_bits": 8, "group_size": 16},
    "fira": {"name": "fira", "rank": 8, "update_proj_gap": 2},
    "apollo": {"name": "apollo", "rank": 8, "update_proj_gap": 2},
    "apollo-mini-int8": {"name": "apollo-mini", "update_proj_gap": 2, "weight_bits": 8, "group_size": 16},
    "lisa-apollo-mini": {"name": "lisa", "optimizer": "apollo-mini", "sampled_layers": 2, "interval": 2},
    "lisa": {"name": "lisa", "rank": 8, "sampled_layers": 2, "interval": 2},
    "owlore": {"name": "owlore", "rank": 8, "sampled_layers": 2, "interval": 2, "calibration_samples": 4,
               "calibration_seq_len": 32},
    "welore": {"name": "welore", "rank": 8, "rank_reduction": 0.3},
    "lora": {"name": "lora", "lora_rank": 4},
    "qlora": {"name": "qlora", "lora_rank": 4},
    "dora": {"name": "dora", "lora_rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
}


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """tiny-gemma3 with random weights and a BOS-first tokenizer, saved as a pretrained model."""
    path = tmp_path_factory.mktemp("tiny-gemma3")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(resolve_model("tiny-gemma3").config, dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    model.save_pretrained(path)
    texts = [f"{r['passage']}\nQuestion: {r['question']}?\nAnswer: yes no" for r in generate_synthetic_boolq("train", 200)]
    with_bos(train_local_tokenizer(texts, 400)).save_pretrained(path)
    return path


def gemma_profile(out, gemma_dir, strategy: dict) -> dict:
    return tiny_profile(out, model={"name": str(gemma_dir), "init": "pretrained", "dtype": "float32"},
                        strategy=strategy, data={"max_seq_len": 64},
                        train={"max_steps": 4, "save_every": 2, "eval_every": 2, "activation_checkpointing": True})


def tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def run_in_process(raw: dict, resume: bool = False, stop_after: int | None = None) -> TrainingRun:
    control = RunControl()
    sink = StopAfter(control, stop_after) if stop_after else Recorder()
    run = TrainingRun(profile_from_dict(raw), resume, sink, control)
    try:
        run.setup()
        assert tied(run.model), "embeddings untied at load"
        run.outcome = run.train()
        assert tied(run.model), "embeddings untied by training"
    finally:
        run.cleanup()
    return run


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_gemma3_resumes_exactly_and_saves_what_it_trained(strategy, gemma_dir, tmp_path):
    whole = run_in_process(gemma_profile(tmp_path / "whole", gemma_dir, STRATEGIES[strategy]))
    assert whole.outcome.status == "completed"
    steps = losses(tmp_path / "whole")
    assert len(steps) == 4 and all(torch.isfinite(torch.tensor(list(steps.values()))))

    raw = gemma_profile(tmp_path / "broken", gemma_dir, STRATEGIES[strategy])
    assert run_in_process(raw, stop_after=2).outcome.status == "stopped"
    assert run_in_process(raw, resume=True).outcome.status == "completed"
    assert losses(tmp_path / "broken") == steps

    # The final model: plain transformers (a WeLore run writes factors: merged first), its
    # embeddings still one tensor, and the logits the run's model gave at the end.
    final = tmp_path / "whole" / "final"
    if strategy == "welore":
        from click.testing import CliRunner

        from lowmem_tune.cli import main

        result = CliRunner().invoke(main, ["merge", str(final), "-o", str(tmp_path / "merged")])
        assert result.exit_code == 0, result.output
        final = tmp_path / "merged"
    loaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert tied(loaded)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    whole.model.eval()
    with torch.no_grad():
        expected, got = whole.model(ids).logits, loaded(ids).logits
    tolerance = 1e-3 if strategy == "welore" else 1e-5  # merging multiplies the factors back
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
