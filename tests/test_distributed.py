"""Several processes (gloo on the CPU): the same weights as one process with the same global batch,
bitwise identical processes at every step, the CLI's launcher, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lowmem_tune.cli import main
from lowmem_tune.train import RunControl, run_training
from lowmem_tune.profile import profile_from_dict

HELPER = Path(__file__).resolve().parent / "helpers" / "ddp_run.py"
ROOT = Path(__file__).resolve().parent.parent


class _Quiet:
    def emit(self, event) -> None:
        pass


def demo_profile(out: Path, micro: int, **strategy) -> dict:
    return {
        "model": {"name": "demo-llama", "init": "random", "dtype": "float64"}, "hardware": {"device": "cpu"},
        "strategy": {"rank": 16, "update_proj_gap": 3, "bits": 32, **strategy},
        "data": {"dataset": "synthetic-boolq", "num_examples": 200, "max_seq_len": 64, "heldout": 0},
        "train": {"max_steps": 5, "micro_batch_size": micro, "gradient_accumulation": 2, "lr": 2e-3,
                  "scheduler": "constant", "save_every": 1000, "seed": 4, "activation_checkpointing": False},
        "output": {"dir": str(out), "save_final": False},
    }


def torchrun(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.parametrize("strategy", [{"name": "galore", "layerwise": True},
                                      # each matrix's gradient averaged in its hook, then updated there
                                      {"name": "apollo", "layerwise": True},
                                      {"name": "lisa", "optimizer": "apollo-mini", "sampled_layers": 2, "interval": 2},
                                      {"name": "owlore", "sampled_layers": 2, "interval": 2},
                                      # both processes compress; the fresh cache gets one entry
                                      {"name": "welore", "weight_bits": 8, "group_size": 32},
                                      {"name": "full"},
                                      # DDP over the adapters only (peft), dropout off: the same masks
                                      {"name": "lora", "lora_rank": 4, "lora_dropout": 0.0}])
def test_two_processes_end_where_one_process_with_twice_the_micro_batch_does(tmp_path, strategy):
    raw = demo_profile(tmp_path / "two", micro=2, **strategy)
    if strategy["name"] in ("full", "lora"):  # no GaLore knobs
        raw["strategy"] = strategy
    profile_file = tmp_path / "profile.json"
    profile_file.write_text(json.dumps(raw))
    done = torchrun([str(HELPER), str(profile_file), str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}.digests").read_text().splitlines() for r in (0, 1)]
    assert len(digests[0]) == 5 and digests[0] == digests[1]  # bitwise the same weights after every step
    if strategy["name"] == "welore":  # process 0 cached the compressed model, whole: the run below reads it
        entries = list((Path(os.environ["LOWMEM_TUNE_CACHE"]) / "welore-models").iterdir())
        assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()

    single = dict(raw, output={"dir": str(tmp_path / "one"), "save_final": False})
    single["train"] = dict(raw["train"], micro_batch_size=4)
    run = None
    from lowmem_tune.train.run import TrainingRun

    run = TrainingRun(profile_from_dict(single), False, _Quiet(), RunControl())
    try:
        run.setup()
        run.train()
        reference = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    finally:
        run.cleanup()
    two = torch.load(tmp_path / "rank0.pt")
    # INT8 codes count in code steps: one code rounded the other way is over the bound
    moved = sum(float((reference[k].double() - v.double()).norm()) ** 2 for k, v in two.items()) ** 0.5
    norm = sum(float(v.double().norm()) ** 2 for v in reference.values()) ** 0.5
    assert moved <= 1e-6 * norm, moved / norm  # relative to the weights: float64, the same global batches


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lowmem_tune", "run", "demo", "--headless", "--nproc-per-node", "2",
                             "--set", f"output.dir={out}", "--set", "train.max_steps=14", "--set", "train.save_every=100",
                             # bf16 weights: stochastic rounding, whose generator state the resume must restore
                             "--set", "model.dtype=bfloat16",
                             "--set", "eval.tasks=[]", *extra], cwd=out.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigint_to_the_launcher_checkpoints_and_resume_continues_the_same_losses(tmp_path):
    import signal
    import time

    straight = _launch(tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]
    stopped = _launch(tmp_path / "stopped")
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        assert time.monotonic() < deadline and stopped.poll() is None, stopped.stderr.read()[-2000:]
        time.sleep(0.1)
    stopped.send_signal(signal.SIGINT)
    stopped.wait(timeout=300)
    checkpoints = sorted((tmp_path / "stopped" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and 4 <= int(checkpoints[0].name.split("-")[1]) < 14
    resumed = _launch(tmp_path / "stopped", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "straight")


@pytest.mark.parametrize("args, message", [
    (["--nproc-per-node", "0"], "--nproc-per-node 0: give at least 1 process"),
])
def test_bad_process_counts_are_one_line_errors(args, message):
    result = CliRunner().invoke(main, ["run", "demo", *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0]


def test_more_processes_than_gpus_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = CliRunner().invoke(main, ["run", "demo", "--nproc-per-node", "2"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "this machine has 1 CUDA GPU(s)" in lines[0]


def test_resuming_with_another_number_of_processes_is_a_one_line_error(tmp_path):
    import yaml

    raw = demo_profile(tmp_path / "run", micro=2, name="galore")
    raw["model"]["dtype"] = "float32"
    raw["train"]["save_every"] = 2
    raw["train"]["max_steps"] = 2
    run_training(profile_from_dict(raw), False, _Quiet(), RunControl())
    raw["train"]["max_steps"] = 4
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lowmem_tune", "run", str(path), "--headless", "--resume",
                           "--nproc-per-node", "2"], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr  # refused before any process starts
    assert "was written by 1 process(es), this run has 2; resume with --nproc-per-node 1" in lines[0]


def test_what_several_processes_cannot_do_is_refused_before_they_start():
    result = CliRunner().invoke(main, ["run", "demo", "--nproc-per-node", "2", "--set", "strategy.name=lisa",
                                       "--set", "strategy.optimizer=adamw"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "use optimizer: galore" in lines[0]


def test_other_processes_say_only_their_own_failure(capsys):
    from lowmem_tune.events import Info, RunFinished
    from lowmem_tune.train.distributed import FailuresOnly

    sink = FailuresOnly(1)
    sink.emit(Info("loaded"))
    sink.emit(RunFinished("completed", 5))
    assert capsys.readouterr().err == ""
    sink.emit(RunFinished("failed", 3, "CUDA out of memory; lower train.micro_batch_size"))
    assert capsys.readouterr().err == "process 1: run failed at step 3: CUDA out of memory; lower train.micro_batch_size\n"


def test_only_the_first_process_writes_the_tokenizer_and_strategy_json(tmp_path):
    """A second process trains the same local tokenizer in memory and writes nothing; the first
    writes it whole (so a process reading it meanwhile finds all of it or none of it)."""
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.strategies import StrategyContext, build_strategy
    from lowmem_tune.train.setup import prepare_data

    raw = demo_profile(tmp_path / "run", micro=2, name="owlore", sampled_layers=1, interval=2)
    profile = profile_from_dict(raw)
    resolved = resolve_model("demo-llama")
    second = prepare_data(profile, resolved, tmp_path / "run", processes=2, main=False)
    assert not (tmp_path / "run" / "tokenizer").exists()
    first = prepare_data(profile, resolved, tmp_path / "run", processes=2, main=True)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    for main, written in ((False, False), (True, True)):
        strategy = build_strategy(profile)
        from lowmem_tune.modeling import load_model

        model = load_model(resolved, "random", torch.float64, torch.device("cpu"))
        ctx = StrategyContext(device=torch.device("cpu"), dtype=torch.float64, run_dir=tmp_path / "run",
                              main=main)
        strategy.prepare_model(model, ctx)
        strategy.write_summary()
        assert (tmp_path / "run" / "strategy.json").is_file() == written


def test_a_process_that_waits_too_long_at_a_barrier_says_for_what(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(
        "import time, torch.distributed as dist\n"
        "from lowmem_tune.errors import UserError\n"
        "from lowmem_tune.train.distributed import World\n"
        "world = World.from_env(); world.start('cpu')\n"
        "if world.rank == 0:\n"
        "    time.sleep(8)\n"
        "try:\n"
        "    world.barrier(\"process 0's baseline evaluation\", 2, 'set eval.baseline: false')\n"
        "except UserError as err:\n"
        "    print('ERROR', err, flush=True)\n"
    )
    done = torchrun([str(script)], tmp_path, timeout=120)
    assert "ERROR process 1 waited 2 s for process 0's baseline evaluation" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "set eval.baseline: false" in done.stdout
