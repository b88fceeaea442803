"""The training loop end to end on a tiny model: metrics, exact resume, crash safety, final model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lowmem_tune.cli import main
from lowmem_tune.errors import UserError
from lowmem_tune.events import RunFinished
from lowmem_tune.modeling import resolve_dtype
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train import RunControl, run_training
from lowmem_tune.train.checkpoint import latest_checkpoint


def tiny_profile(out: Path, **sections) -> dict:
    raw = {
        "model": {"name": "tiny-llama", "init": "random"},
        "hardware": {"device": "cpu"},
        "strategy": {"name": "full"},
        "data": {"dataset": "synthetic-boolq", "num_examples": 96, "max_seq_len": 48, "heldout": 16},
        "train": {"max_steps": 6, "micro_batch_size": 4, "gradient_accumulation": 2, "lr": 1e-3,
                  "warmup_steps": 2, "save_every": 3, "eval_every": 3, "log_every": 1, "seed": 1,
                  "activation_checkpointing": False},
        "output": {"dir": str(out)},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


class Recorder:
    def __init__(self):
        self.events = []

    def emit(self, event):
        self.events.append(event)


def write_profile(tmp_path: Path, raw: dict) -> Path:
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


class StopAfter(Recorder):
    """Requests a graceful stop once step `k` has been reported, as Ctrl-C or `q` would."""

    def __init__(self, control: RunControl, k: int):
        super().__init__()
        self.control, self.k = control, k

    def emit(self, event):
        super().emit(event)
        if getattr(event, "metrics", {}).get("step") == self.k:
            self.control.request_stop()


def test_metrics_checkpoints_and_final_model(tmp_path):
    profile = profile_from_dict(tiny_profile(tmp_path / "run"))
    recorder = Recorder()
    outcome = run_training(profile, resume=False, sink=recorder)
    assert outcome.status == "completed" and outcome.step == 6
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "rss"):
        assert key in lines[0]
    assert lines[0]["grad_norm"] > 0
    assert lines[0]["lr"] == pytest.approx(5e-4)  # warmup step 1 of 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-6"]
    assert isinstance(recorder.events[-1], RunFinished)
    assert (run / "profile.yaml").is_file() and (run / "events.jsonl").is_file()
    assert recorder.events[0].dtype == str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")

    # The final model loads with plain transformers and gives the trained model's logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    ids = tokenizer("The red box holds 3 coins.", return_tensors="pt")["input_ids"]
    trained = AutoModelForCausalLM.from_config(final.config)
    from safetensors.torch import load_model

    load_model(trained, str(run / "checkpoints" / "step-6" / "model.safetensors"))
    torch.testing.assert_close(final(ids).logits, trained(ids).logits, rtol=0, atol=0)


def test_resume_continues_the_identical_trajectory(tmp_path):
    reference = profile_from_dict(tiny_profile(tmp_path / "ref"))
    run_training(reference, resume=False, sink=Recorder())

    raw = tiny_profile(tmp_path / "stopped", train={"save_every": 100})
    control = RunControl()
    outcome = run_training(profile_from_dict(raw), resume=False, sink=StopAfter(control, 4), control=control)
    assert outcome.status == "stopped" and outcome.step == 4
    assert latest_checkpoint(tmp_path / "stopped" / "checkpoints").step == 4
    outcome = run_training(profile_from_dict(raw), resume=True, sink=Recorder())
    assert outcome.status == "completed"
    assert losses(tmp_path / "stopped") == losses(tmp_path / "ref")  # bitwise equal floats


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    raw = tiny_profile(tmp_path / "run", train={"max_steps": 3})
    run_training(profile_from_dict(raw), resume=False, sink=Recorder())
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    runner = CliRunner()
    path = tmp_path / "p.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(main, ["run", str(path), "--headless"])
    assert result.exit_code == 2 and "already holds a run" in result.output
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    raw["output"]["dir"] = str(tmp_path / "empty")
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(main, ["run", str(path), "--headless", "--resume"])
    assert result.exit_code == 2 and "no checkpoint" in result.output


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.name=galor", "strategy.name"),
        ("data.dataset=/nonexistent/file.jsonl", "file not found"),
        ("data.dataset=nosuchtask", "data.dataset"),
        ("train.lr=-1", "train.lr"),
        ("model.name=llama-2-7", "did you mean"),
        ("eval.tasks=[boolk]", "did you mean 'boolq'"),
        ("eval.data_files={boolq: /nonexistent/boolq.jsonl}", "eval.data_files names task(s) boolq"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, override, message):
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_profile(tmp_path / "run")))
    result = subprocess.run(
        [sys.executable, "-m", "lowmem_tune", "run", str(path), "--headless", "--set", override],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    """SIGKILL while step-N is being written: step-(N-k) stays loadable, and --resume from it gives
    the losses of a run that was never killed."""
    import yaml

    # constant lr: the resumed run stops early, and its losses must not depend on max_steps
    settings = {"save_every": 2, "keep_checkpoints": 2, "scheduler": "constant"}
    raw = tiny_profile(tmp_path / "run", train={"max_steps": 400, **settings})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    # Slow every checkpoint write down so the kill lands inside one, deterministically.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent / "helpers")}
    proc = subprocess.Popen([sys.executable, "-m", "slow_checkpoint_run", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        partial = list(checkpoints.glob(".step-*.tmp-*")) if checkpoints.exists() else []
        if partial and latest_checkpoint(checkpoints) is not None and (partial[0] / "model.safetensors").exists():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no checkpoint write was observed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    survivor = latest_checkpoint(checkpoints)
    assert survivor is not None
    state = torch.load(survivor.path / "trainer_state.pt", weights_only=True)
    assert state["step"] == survivor.step

    raw["train"]["max_steps"] = survivor.step + 2
    outcome = run_training(profile_from_dict(raw), resume=True, sink=Recorder())
    assert outcome.status == "completed" and outcome.step == survivor.step + 2
    assert not list(checkpoints.glob(".step-*"))
    unbroken = tiny_profile(tmp_path / "ref", train={"max_steps": survivor.step + 2, **settings})
    run_training(profile_from_dict(unbroken), resume=False, sink=Recorder())
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_sigint_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A real Ctrl-C (SIGINT) to `run --headless`: checkpoint, clean exit, and --resume continues
    with exactly the losses an uninterrupted run has."""
    import yaml

    raw = tiny_profile(tmp_path / "run", train={"max_steps": 20, "save_every": 1000})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "lowmem_tune", "run", str(path), "--headless"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    stopped_at = latest_checkpoint(tmp_path / "run" / "checkpoints").step
    assert 3 <= stopped_at < 20 and "continue with --resume" in output

    result = subprocess.run([sys.executable, "-m", "lowmem_tune", "run", str(path), "--headless", "--resume"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reference = profile_from_dict(tiny_profile(tmp_path / "ref", train={"max_steps": 20, "save_every": 1000}))
    run_training(reference, resume=False, sink=Recorder())
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_a_non_finite_loss_fails_the_run_at_the_step_it_happened(tmp_path):
    """lr 1e30 without clipping: step 1's update overflows the weights, so step 2's loss is NaN."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "run", str(write_profile(tmp_path, tiny_profile(out))), "--headless", "--set", "train.lr=1e30",
        "--set", "train.warmup_steps=0", "--set", "train.max_grad_norm=null", "--set", "train.save_every=1"])
    assert result.exit_code == 1
    summary = [line for line in result.output.splitlines() if line.startswith("run failed")]
    assert summary == [summary[0]] and summary[0].startswith("run failed at step 2: loss became nan at step 2")
    assert "the last good checkpoint is" in summary[0] and "step-1" in summary[0]
    finished = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()][-1]
    assert finished["type"] == "RunFinished" and finished["status"] == "failed" and finished["step"] == 2
    assert list(losses(out)) == [1]
    assert [c.step for c in [latest_checkpoint(out / "checkpoints")]] == [1]


def test_out_of_memory_fails_the_run_at_the_step_it_happened(tmp_path):
    from lowmem_tune.train.run import TrainingRun

    recorder = Recorder()
    run = TrainingRun(profile_from_dict(tiny_profile(tmp_path / "run")), False, recorder, RunControl())
    run.setup()
    decoder = run.model.get_decoder()  # what the loss runs (loss.py)
    forward, calls = decoder.forward, []

    def forward_until_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:  # two micro-batches a step: the 5th forward is step 3's first
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    decoder.forward = forward_until_out_of_memory
    try:
        outcome = run.train()
    finally:
        run.cleanup()
    assert (outcome.status, outcome.step, outcome.exit_code) == ("failed", 3, 1)
    finished = recorder.events[-1]
    assert isinstance(finished, RunFinished) and finished.step == 3
    assert finished.message.startswith("CUDA out of memory at step 3") and "lower train.micro_batch_size" in finished.message


def test_headless_lines_have_no_library_progress_bars_and_one_line_per_evaluation(tmp_path):
    raw = tiny_profile(tmp_path / "run", eval={"tasks": ["synthetic-boolq"], "baseline": True, "limit": 8})
    result = CliRunner().invoke(main, ["run", str(write_profile(tmp_path, raw)), "--headless"])
    assert result.exit_code == 0, result.output
    for noise in ("Writing model shards", "Loading weights", "it/s", "%|"):
        assert noise not in result.output
    baseline = [line for line in result.output.splitlines() if "baseline" in line]
    assert len(baseline) == 1 and baseline[0].startswith("baseline eval: synthetic-boolq acc=")
    assert len([line for line in result.output.splitlines() if "final eval" in line]) == 1


@pytest.mark.parametrize("adds_bos, add_bos, expect_bos", [
    (False, None, False), (True, None, True), (True, False, False), (False, True, True),
])
def test_training_examples_and_evaluation_requests_begin_the_same_way(tmp_path, monkeypatch, adds_bos, add_bos,
                                                                      expect_bos):
    from test_eval_support import fixture_path, fixture_rows, with_bos

    from lowmem_tune.data import BatchStream, generate_synthetic_boolq, train_local_tokenizer
    from lowmem_tune.evaluation.loglikelihood import LoglikelihoodScorer

    texts = [r["passage"] + r["question"] for r in generate_synthetic_boolq("train", 50)]
    texts += [r["passage"] + r["question"] for r in fixture_rows("boolq")]
    tokenizer = train_local_tokenizer(texts, 256)
    (with_bos(tokenizer) if adds_bos else tokenizer).save_pretrained(tmp_path / "tokenizer")
    first_tokens: dict[str, set[int]] = {"train": set(), "eval": set()}

    def next_batch(stream):
        batch = real_next_batch(stream)
        first_tokens["train"].update(batch["input_ids"][:, 0].tolist())
        return batch

    def score(scorer, pairs, progress=None):
        first_tokens["eval"].update(ctx[0] for ctx, _ in pairs)
        return real_score(scorer, pairs, progress)

    real_next_batch, real_score = BatchStream.next_batch, LoglikelihoodScorer.score
    monkeypatch.setattr(BatchStream, "next_batch", next_batch)
    monkeypatch.setattr(LoglikelihoodScorer, "score", score)
    raw = tiny_profile(tmp_path / "run", model={"tokenizer": str(tmp_path / "tokenizer")},
                       train={"max_steps": 2, "save_every": 2, "eval_every": 2},
                       eval={"tasks": ["boolq"], "data_files": {"boolq": str(fixture_path("boolq"))}, "limit": 4,
                             "add_bos": add_bos})
    outcome = run_training(profile_from_dict(raw), resume=False, sink=Recorder())
    assert outcome.status == "completed"
    bos = tokenizer.bos_token_id
    assert first_tokens["train"] and first_tokens["eval"]
    for stage, tokens in first_tokens.items():
        assert (tokens == {bos}) if expect_bos else (bos not in tokens), stage
    results = json.loads((tmp_path / "run" / "eval.json").read_text())["final"]
    assert results["protocol"]["tasks"]["boolq"]["bos"] is expect_bos


def _fail_loading(*args, **kwargs):
    raise RuntimeError("out of memory while loading the weights")


def _fail_evaluating(self, stage):
    raise OSError("the evaluation data vanished")


def _fail_saving(self, model, out_dir):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where, patch, reason, checkpoint", [
    ("setup", ("lowmem_tune.train.run.load_model", _fail_loading), "out of memory while loading", None),
    ("final evaluation", ("lowmem_tune.train.run.TrainingRun.evaluate", _fail_evaluating), "evaluation data vanished",
     "step-6"),
    ("saving", ("lowmem_tune.strategies.base.Strategy.save_final", _fail_saving), "No space left on device", "step-6"),
])
def test_a_run_that_fails_outside_the_loop_still_ends_with_the_reason(tmp_path, monkeypatch, where, patch, reason,
                                                                      checkpoint):
    monkeypatch.setattr(*patch)
    raw = tiny_profile(tmp_path / "run", eval={"tasks": ["synthetic-boolq"], "limit": 8})
    with pytest.raises((RuntimeError, OSError)):
        run_training(profile_from_dict(raw), resume=False, sink=Recorder())
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    last = events[-1]
    assert last["type"] == "RunFinished" and last["status"] == "failed", where
    assert reason in last["message"]
    if checkpoint:
        assert f"checkpoints/{checkpoint}" in last["message"]
    else:
        assert "no checkpoint was written" in last["message"]
    assert sum(e["type"] == "RunFinished" for e in events) == 1
    assert not list((tmp_path / "run").glob(".final*"))  # no half-written final model


def test_resume_drops_the_earlier_sessions_end_and_later_lines(tmp_path):
    control = RunControl()
    raw = tiny_profile(tmp_path / "run", train={"save_every": 2})
    assert run_training(profile_from_dict(raw), False, StopAfter(control, 3), control).status == "stopped"
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["type"] == "CheckpointSaved" and e["step"] == 3 for e in events)  # the stop's checkpoint
    # Resume from step 3 after cutting the checkpoint of step 3 away: the run continues from step 2,
    # and events of step 3 (its metrics, its checkpoint, the stop) are not part of its story.
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-3")
    assert run_training(profile_from_dict(raw), True, Recorder()).status == "completed"
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    finished = [e for e in events if e["type"] == "RunFinished"]
    assert [e["status"] for e in finished] == ["completed"]
    saved = [e["step"] for e in events if e["type"] == "CheckpointSaved"]
    assert saved == [2, 4, 6]
    steps = [e["metrics"]["step"] for e in events if e["type"] == "StepMetrics"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resuming_with_another_optimizer_is_a_one_line_error(tmp_path):
    """A checkpoint written by fp32 AdamW (torch's) resumed as bf16 (AdamW with stochastic rounding,
    another updater): what changed and how to resume, not a KeyError from deep in the optimizer."""
    raw = tiny_profile(tmp_path / "run", train={"max_steps": 2, "save_every": 2}, model={"dtype": "float32"})
    assert run_training(profile_from_dict(raw), resume=False, sink=Recorder()).status == "completed"
    raw["model"]["dtype"] = "bfloat16"
    raw["train"]["max_steps"] = 4
    with pytest.raises(UserError, match=r"--resume: .* another optimizer .* model.dtype \(here bfloat16\)") as err:
        run_training(profile_from_dict(raw), resume=True, sink=Recorder())
    assert "\n" not in str(err.value)
