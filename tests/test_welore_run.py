"""`run` with strategy welore end to end: compression at start, exact resume, a final model that
`load_model` (so `run` and `eval`) reads back."""

from __future__ import annotations

import json

import torch

from lowmem_tune.catalog import resolve_model
from lowmem_tune.compress import lowrank_modules
from lowmem_tune.modeling import load_model
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train import RunControl, run_training
from tests.test_train import Recorder, StopAfter, losses, tiny_profile


def welore_run(out, **train):
    return profile_from_dict(tiny_profile(out, strategy={"name": "welore", "optimizer": "adamw", "rank_reduction": 0.5},
                                          train={"max_steps": 4, "save_every": 100, **train}))


def test_welore_run_resumes_exactly_and_saves_a_loadable_compressed_final(tmp_path):
    outcome = run_training(welore_run(tmp_path / "ref"), resume=False, sink=Recorder())
    assert outcome.status == "completed"
    table = json.loads((tmp_path / "ref" / "strategy.json").read_text())
    assert abs(table["rank_reduction_achieved"] - 0.5) <= 0.005 and len(table["matrices"]) == 14

    control = RunControl()
    stopped = welore_run(tmp_path / "stopped")
    outcome = run_training(stopped, resume=False, sink=StopAfter(control, 2), control=control)
    assert outcome.status == "stopped" and outcome.step == 2
    outcome = run_training(stopped, resume=True, sink=Recorder())  # re-compresses from the cached spectra
    assert outcome.status == "completed"
    assert losses(tmp_path / "stopped") == losses(tmp_path / "ref")

    final = load_model(resolve_model(str(tmp_path / "ref" / "final")), "pretrained", torch.float32,
                       torch.device("cpu"))
    lrc = {m["name"]: m["rank"] for m in table["matrices"] if m["lrc"]}
    assert {name: module.rank for name, module in lowrank_modules(final).items()} == lrc


def _local_tiny_model(tmp_path):
    """A pretrained-looking tiny Llama directory (random weights, a locally trained tokenizer)."""
    from transformers import AutoModelForCausalLM

    from lowmem_tune.data import train_local_tokenizer

    torch.manual_seed(0)
    source = tmp_path / "model"
    AutoModelForCausalLM.from_config(resolve_model("tiny-llama").config).save_pretrained(source)
    tokenizer = train_local_tokenizer(["the red box holds 3 coins", "is the blue box empty? yes"] * 50, 200)
    tokenizer.save_pretrained(source)
    return source


def _dequantized_factors(module) -> dict[str, torch.Tensor]:
    return {"left": module.left.dequantized(torch.bfloat16), "right": module.right.dequantized(torch.bfloat16)}


def test_the_default_plan_where_only_welore_fits_runs_with_int8_factors_resumes_exactly_and_saves_16_bit(tmp_path):
    """llama-2-7b on an 8 GB card: only WeLore fits (with INT8 factors and a searched rank
    reduction). That profile, pointed at a tiny local model: the run compresses it on the CPU,
    trains INT8 factors (GaLore through their codes), resumes bit-identically, and writes a
    compressed directory of 16-bit factors equal to the trained codes dequantized."""
    from click.testing import CliRunner

    from lowmem_tune.cli import main
    from lowmem_tune.compress.lowrank import Int8LowRankLinear
    from lowmem_tune.profile import load_profile
    from lowmem_tune.train.run import TrainingRun

    plan = tmp_path / "plan.yaml"
    result = CliRunner().invoke(main, ["plan", "--model", "llama-2-7b", "--gpu", "rtx4060", "--seq-len", "512",
                                       "--json", "-o", str(plan)])
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.output)["chosen"]
    fitting = [c["strategy"] for c in json.loads(result.output)["candidates"] if c["fits"] and c["full_parameter"]]
    assert chosen["strategy"] == "welore" and fitting == ["welore"]  # (QLoRA fits too: listed apart, not chosen)
    source = _local_tiny_model(tmp_path)
    overrides = [f"model.name={source}", "data.dataset=synthetic-boolq", "data.num_examples=64", "data.heldout=0",
                 "data.max_seq_len=48", "eval.tasks=[]", "train.max_steps=6", "train.micro_batch_size=4",
                 "train.gradient_accumulation=1", "train.lr=3e-3", "train.save_every=3", "train.log_every=1",
                 "hardware.device=cpu", "strategy.update_proj_gap=2", "strategy.rank=8"]
    straight = load_profile(plan, overrides + [f"output.dir={tmp_path / 'straight'}"])
    s = straight.strategy
    assert (s.name, s.weight_bits, s.rank_reduction) == ("welore", 8, chosen["settings"]["rank_reduction"])
    assert s.rank_reduction in (0.3, 0.5, 0.7)
    assert run_training(straight, False, Recorder()).status == "completed"

    stopped = load_profile(plan, overrides + [f"output.dir={tmp_path / 'stopped'}"])
    control = RunControl()
    assert run_training(stopped, False, StopAfter(control, 3), control=control).status == "stopped"
    run = TrainingRun(stopped, True, Recorder(), RunControl())
    try:
        run.setup()
        factors = lowrank_modules(run.model)
        assert factors and all(type(m) is Int8LowRankLinear for m in factors.values())
        assert all(m.left.codes.dtype == torch.int8 and m.left.weight.untyped_storage().nbytes() == 2  # one bf16
                   for m in factors.values())
        run.train()
        trained = {name: _dequantized_factors(m) for name, m in lowrank_modules(run.model).items()}
    finally:
        run.cleanup()
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")

    saved = load_model(resolve_model(str(tmp_path / "stopped" / "final")), "pretrained", torch.bfloat16,
                       torch.device("cpu"))
    assert set(lowrank_modules(saved)) == set(trained)
    for name, module in lowrank_modules(saved).items():
        assert torch.equal(module.left, trained[name]["left"]) and torch.equal(module.right, trained[name]["right"])

    fresh = TrainingRun(load_profile(plan, overrides + [f"output.dir={tmp_path / 'fresh'}"]), False, Recorder(),
                        RunControl())
    try:
        fresh.setup()  # the compressed model from the cache, quantized: where training started
        begin = {name: _dequantized_factors(m) for name, m in lowrank_modules(fresh.model).items()}
    finally:
        fresh.cleanup()
    # every LRC trained (one micro-batch a step: each takes its first basis at step 0; with several,
    # first-basis sketches wait for room, and on a model this small the last ones wait for steps)
    assert all(not torch.equal(begin[n]["left"], trained[n]["left"]) for n in trained)
    logged = losses(tmp_path / "straight")
    assert logged[6] < logged[1]


def test_a_planned_welore_profile_compresses_once_and_a_second_run_reads_the_cache(tmp_path, monkeypatch):
    """`plan --strategy welore -o` for a local model: the run compresses (on the CPU, where the
    dense model was loaded) and caches the compressed model; a second run loads it from the cache
    and does no factorization."""
    from click.testing import CliRunner

    from lowmem_tune.cli import main
    from lowmem_tune.compress import lowrank
    from lowmem_tune.events import Info
    from lowmem_tune.profile import load_profile

    source = _local_tiny_model(tmp_path)
    plan = tmp_path / "welore.yaml"
    result = CliRunner().invoke(main, ["plan", "--model", str(source), "--gpu", "16GiB", "--strategy", "welore",
                                       "--seq-len", "48", "-o", str(plan)])
    assert result.exit_code == 0, result.output
    overrides = ["data.dataset=synthetic-boolq", "data.num_examples=64", "data.heldout=0", "eval.tasks=[]",
                 "train.max_steps=3", "train.micro_batch_size=4", "train.gradient_accumulation=1",
                 "hardware.device=cpu", "strategy.optimizer=adamw"]
    profile = load_profile(plan, overrides + [f"output.dir={tmp_path / 'first'}"])
    assert profile.strategy.name == "welore" and profile.strategy.rank_reduction == 0.3
    first = Recorder()
    assert run_training(profile, False, first).status == "completed"
    assert not any("read from the cache" in e.message for e in first.events if isinstance(e, Info))

    def no_factorizing(*args, **kwargs):
        raise AssertionError("factorized again")

    monkeypatch.setattr(lowrank.LowRankLinear, "from_linear", no_factorizing)
    second = Recorder()
    profile = load_profile(plan, overrides + [f"output.dir={tmp_path / 'second'}"])
    assert run_training(profile, False, second).status == "completed"
    assert any("read from the cache" in e.message for e in second.events if isinstance(e, Info))
    assert json.loads((tmp_path / "second" / "strategy.json").read_text())["lrc"] == \
        json.loads((tmp_path / "first" / "strategy.json").read_text())["lrc"]
