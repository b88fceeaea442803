"""LoRA, QLoRA and DoRA through peft: what trains, what a checkpoint holds, the adapter in peft's
format beside the merged final/, the NF4 base left alone by evaluation, and the errors of their
knobs. (Training, exact resume and final/'s logits on a Gemma 3 model: test_gemma.py.)"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lowmem_tune.cli import main
from lowmem_tune.errors import UserError
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.strategies import StrategyContext, build_strategy
from lowmem_tune.train import RunControl
from lowmem_tune.train.run import TrainingRun
from tests.test_train import Recorder, tiny_profile, write_profile


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """tiny-llama with random weights saved as a pretrained model (and its tokenizer, from a run)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    raw = tiny_profile(path / "run", train={"max_steps": 1, "save_every": 100, "eval_every": 100})
    run = TrainingRun(profile_from_dict(raw), False, Recorder(), RunControl())
    try:
        run.setup()
        run.model.save_pretrained(path / "model")
        run.data.tokenizer.save_pretrained(path / "model")
    finally:
        run.cleanup()
    return path / "model"


def adapter_profile(out, base_dir, **strategy) -> dict:
    return tiny_profile(out, model={"name": str(base_dir), "init": "pretrained", "dtype": "float32"},
                        strategy={"lora_rank": 4, "lora_dropout": 0.0, **strategy},
                        train={"max_steps": 2, "save_every": 2, "eval_every": 100})


def trained_run(raw: dict) -> TrainingRun:
    run = TrainingRun(profile_from_dict(raw), False, Recorder(), RunControl())
    try:
        run.setup()
        run.outcome = run.train()
    finally:
        run.cleanup()
    return run


@pytest.mark.parametrize("name", ["lora", "qlora", "dora"])
def test_only_the_adapters_train_and_a_checkpoint_holds_only_them(name, base_dir, tmp_path):
    raw = adapter_profile(tmp_path, base_dir, name=name)
    raw["output"]["save_final"] = False  # final/ is merged: the adapters leave the model
    run = trained_run(raw)
    trained = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    if name == "dora":
        assert any("lora_magnitude_vector" in n for n in trained)
    assert all(p.dtype == torch.float32 for n, p in run.model.named_parameters() if p.requires_grad)
    with safe_open(str(tmp_path / "checkpoints" / "step-2" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == trained
    info = run.strategy.describe()
    assert 0 < info["trainable_parameters"] < info["total_parameters"]


def test_qlora_base_is_nf4_and_evaluation_leaves_it_as_it_was(base_dir, tmp_path):
    import bitsandbytes as bnb

    raw = adapter_profile(tmp_path, base_dir, name="qlora")
    profile = profile_from_dict(raw)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = build_strategy(profile).prepare_model(model, StrategyContext(torch.device("cpu"), torch.float32))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * model.config.num_hidden_layers
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in quantized)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train()
    model(ids).logits.sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "an evaluation changed the NF4 base"


def test_final_holds_the_adapter_in_peft_format_and_the_merged_model(base_dir, tmp_path):
    from peft import PeftModel

    run = trained_run(adapter_profile(tmp_path, base_dir, name="lora"))
    final = tmp_path / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits, run.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_adapter_knob_errors_name_the_key(base_dir, tmp_path):
    raw = adapter_profile(tmp_path, base_dir, name="lora", target_modules=["q_prj"])
    result = CliRunner().invoke(main, ["run", str(write_profile(tmp_path, raw)), "--headless"])
    assert result.exit_code == 2
    assert "strategy.target_modules: q_prj" in result.output and "q_proj" in result.output
    assert "Traceback" not in result.output

    with pytest.raises(UserError, match="strategy.train_embeddings"):
        build_strategy(profile_from_dict(adapter_profile(tmp_path, base_dir, name="qlora", train_embeddings=True)))
    with pytest.raises(UserError, match="strategy.lora_rank does not apply to strategy galore"):
        profile_from_dict(tiny_profile(tmp_path, strategy={"name": "galore", "lora_rank": 8}))
