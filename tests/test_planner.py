"""`lowmem-tune plan`: answers, errors, JSON schema, profiles, and how estimates scale."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lowmem_tune.cli import main
from lowmem_tune.planner.architecture import resolve_architecture
from lowmem_tune.planner.estimate import COMPONENTS, Workload, estimate
from lowmem_tune.profile import StrategySection, load_profile

STRATEGIES = ("full", "adamw8bit", "galore", "fira", "lisa", "owlore")


def _plan(*args: str):
    return CliRunner().invoke(main, ["plan", *args])


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


def test_gpu_auto_without_gpu_suggests_a_preset(monkeypatch):
    import pynvml

    def no_driver():
        raise pynvml.NVMLError_DriverNotLoaded()

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    _one_line_error(_plan("--model", "llama-2-7b", "--gpu", "auto"), "--gpu rtx4090", "--gpu 24GiB")


def test_unknown_model_lists_close_matches():
    _one_line_error(_plan("--model", "llama-2-7c", "--gpu", "rtx4090"), "llama-2-7b")


def test_malformed_size():
    _one_line_error(_plan("--model", "llama-2-7b", "--gpu", "24GX"), "24GX", "24GiB")


def test_bad_profile_key_and_value(tmp_path):
    bad_key = tmp_path / "key.yaml"
    bad_key.write_text("strategy: {nmae: galore}\n")
    _one_line_error(CliRunner().invoke(main, ["run", str(bad_key)]), "strategy.nmae", "name")
    bad_value = tmp_path / "value.yaml"
    bad_value.write_text("strategy: {name: galroe}\n")
    _one_line_error(CliRunner().invoke(main, ["run", str(bad_value)]), "strategy.name", "galore")


def test_7b_on_a_4090_json_schema_and_verdicts():
    result = _plan("--model", "llama-2-7b", "--gpu", "rtx4090", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["model"]) >= {"name", "params", "layers", "hidden_size", "vocab_size"}
    assert report["model"]["params"] == 6_738_415_616
    assert set(report["gpu"]) >= {"name", "total_bytes", "usable_bytes", "source"} and report["gpu"]["source"] == "preset"
    assert set(report["workload"]) >= {"seq_len", "micro_batch_size", "gradient_checkpointing", "dtype"}
    for candidate in report["candidates"]:
        assert set(candidate) >= {"strategy", "settings", "fits", "memory"}
        assert set(candidate["memory"]) == {*COMPONENTS, "total"}
        assert candidate["memory"]["total"] == sum(candidate["memory"][k] for k in COMPONENTS)
        assert candidate["fits"] == (candidate["memory"]["total"] <= report["gpu"]["usable_bytes"])
    by_name = {c["strategy"]: c for c in report["candidates"]}
    assert by_name["full"]["fits"] is False  # bf16 AdamW: ~4 bytes x 2 per parameter
    assert report["chosen"]["strategy"] in by_name and report["chosen"]["memory"]["total"] <= report["gpu"]["usable_bytes"]
    assert "verify" not in report


def test_text_report_names_each_candidates_settings():
    result = _plan("--model", "llama-2-7b", "--gpu", "rtx4090", "--strategy", "galore")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the report wraps at the terminal's width
    assert "galore [rank=256, bits=8" in text and "micro_batch_size=16" in text
    assert "=None" not in text  # unset settings (the strategy's default) are left out
    assert "Chosen: galore — rank=256" in text


def test_output_profile_is_loadable(tmp_path):
    out = tmp_path / "plan.yaml"
    result = _plan("--model", "demo-llama", "--gpu", "16GiB", "--strategy", "galore", "--seq-len", "256", "-o", str(out))
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert profile.strategy.name == "galore" and profile.data.max_seq_len == 256
    assert profile.hardware.gpu == "16GiB"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimates_grow_with_sequence_length_and_batch(strategy, checkpointing):
    arch = resolve_architecture("llama-2-7b")

    def total(seq_len: int, batch: int) -> int:
        return estimate(StrategySection(name=strategy), arch, Workload(seq_len, batch, checkpointing)).total

    assert total(256, 1) < total(1024, 1) < total(4096, 1)
    assert total(512, 1) < total(512, 4) < total(512, 16)


def test_checkpointing_and_low_rank_save_memory():
    arch = resolve_architecture("llama-2-7b")
    w = Workload(2048, 4, False)
    no_ckpt = estimate(StrategySection(name="adamw8bit"), arch, w)
    ckpt = estimate(StrategySection(name="adamw8bit"), arch, Workload(2048, 4, True))
    assert ckpt.memory["activations"] < no_ckpt.memory["activations"]
    full = estimate(StrategySection(name="full"), arch, w)
    assert full.memory["optimizer"] == 4 * full.memory["weights"]  # two fp32 moments per bf16 weight
    torch_adamw = estimate(StrategySection(name="full", rounding="nearest"), arch, w)
    assert torch_adamw.memory["optimizer"] == 2 * full.memory["weights"]  # torch's: moments in bf16
    galore = estimate(StrategySection(name="galore", rank=128), arch, w)
    assert galore.memory["optimizer"] < no_ckpt.memory["optimizer"] / 10


def test_gpus_plans_per_gpu_memory_and_splits_the_batch(tmp_path):
    one = json.loads(_plan("--model", "llama-2-7b", "--gpu", "rtx4090", "--micro-batch-size", "4", "--json").output)
    two = json.loads(_plan("--model", "llama-2-7b", "--gpu", "rtx4090", "--micro-batch-size", "4", "--gpus", "2",
                           "--json").output)
    assert one["workload"]["gpus"] == 1 and two["workload"]["gpus"] == 2
    assert two["workload"]["gradient_accumulation"] * 2 == one["workload"]["gradient_accumulation"]
    assert two["workload"]["global_batch"] == one["workload"]["global_batch"] == 4 * one["workload"]["gradient_accumulation"]
    assert two["chosen"]["strategy"] == one["chosen"]["strategy"]
    out = tmp_path / "two.yaml"
    text = _plan("--model", "llama-2-7b", "--gpu", "rtx4090", "--micro-batch-size", "4", "--gpus", "2", "-o", str(out))
    assert text.exit_code == 0 and "--nproc-per-node 2" in " ".join(text.output.split())
    assert load_profile(out).train.gradient_accumulation == two["workload"]["gradient_accumulation"]
    _one_line_error(_plan("--model", "llama-2-7b", "--gpu", "rtx4090", "--gpus", "0"), "--gpus 0")


@pytest.mark.parametrize("strategy", ["galore", "owlore", "full"])
def test_several_gpus_cost_at_most_one_averaging_bucket(strategy):
    arch = resolve_architecture("llama-2-7b")
    single = estimate(StrategySection(name=strategy), arch, Workload(512, 1, True, gradient_accumulation=4))
    several = estimate(StrategySection(name=strategy), arch, Workload(512, 1, True, gradient_accumulation=2, gpus=2))
    assert 0 <= several.total - single.total <= 64 * 2**20


def test_the_planners_copies_of_the_codes_constants_agree_with_the_code():
    """planner/components.py (and adapters.py) repeat a few constants so that `plan` never imports torch; they must
    stay the values the code uses."""
    from lowmem_tune import loss, nf4
    from lowmem_tune.optim import moments, subspace, writer
    from lowmem_tune.planner import adapters, components
    from lowmem_tune.train import distributed

    assert components.BLOCKSIZE == moments.BLOCKSIZE
    assert components.MIN_8BIT_SIZE == moments.MIN_8BIT_SIZE
    assert components.SKETCH_OVERSAMPLE == subspace.OVERSAMPLE
    assert components.ROUNDING_BLOCK == writer.BLOCK_ELEMENTS
    assert components.LOSS_CHUNK_TOKENS == loss.CHUNK_TOKENS
    assert components.AVERAGE_BUCKET_BYTES == distributed.BUCKET_BYTES
    assert adapters.NF4_BLOCK == nf4.NF4_BLOCK


@pytest.mark.parametrize("prefer", ["quality", "speed", "memory"])
def test_adapters_are_listed_apart_and_never_chosen_in_place_of_a_full_parameter_method(prefer):
    result = _plan("--model", "llama-2-7b", "--gpu", "rtx4090", "--prefer", prefer, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    kinds = [c["full_parameter"] for c in report["candidates"]]
    assert kinds == sorted(kinds, reverse=True) and kinds.count(False) == 3  # lora, dora, qlora below
    by_name = {c["strategy"]: c for c in report["candidates"]}
    assert by_name["qlora"]["memory"]["weights"] < 0.35 * by_name["lora"]["memory"]["weights"]  # NF4 decoder
    # QLoRA is the smallest of all here, and still not what --prefer memory picks
    assert report["chosen"]["full_parameter"] and report["adapter_instead"] is None


def test_where_no_full_parameter_method_fits_the_adapter_that_does_is_named_not_chosen(tmp_path):
    args = ("--model", "llama-2-13b", "--gpu", "12GB", "--seq-len", "1024")
    report = json.loads(_plan(*args, "--json").output)
    assert report["chosen"] is None and not any(c["fits"] for c in report["candidates"] if c["full_parameter"])
    assert report["adapter_instead"]["strategy"] == "qlora" and report["adapter_instead"]["fits"]
    text = " ".join(_plan(*args).output.split())
    assert "No full-parameter method fits. An adapter method does: qlora, peak 8.81 GiB" in text
    assert "pick it with `--strategy qlora`" in text and "Nothing fits" not in text

    out = tmp_path / "qlora.yaml"
    result = _plan(*args, "--strategy", "qlora", "-o", str(out))
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert profile.strategy.name == "qlora" and profile.strategy.lora_rank == 16 and profile.train.lr == 2e-4
