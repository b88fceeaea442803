"""The training run, top to bottom: set up, loop over optimizer steps, checkpoint, evaluate."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import PreTrainedTokenizerBase

from lowmem_tune.atomic import write_json_atomic, write_text_atomic
from lowmem_tune.catalog import ResolvedModel, resolve_model
from lowmem_tune.data import (
    BatchStream,
    calibration_sequences,
    eval_batches,
    load_examples,
    split_heldout,
    tokenize_examples,
    train_local_tokenizer,
)
from lowmem_tune.errors import UserError
from lowmem_tune.hardware import nvml_index_of_torch_device
from lowmem_tune.events import (
    CheckpointSaved,
    EvalLoss,
    EvalResult,
    EventSink,
    FanOut,
    Info,
    RunFinished,
    RunStarted,
    StepMetrics,
)
from lowmem_tune.modeling import (
    activation_checkpointing_enabled, disable_activation_checkpointing, enable_activation_checkpointing, load_model,
    load_tokenizer, pick_device, resolve_dtype,
)
from lowmem_tune.profile import Profile
from lowmem_tune.strategies import StrategyContext, build_strategy
from lowmem_tune.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial_writes,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lowmem_tune.train.control import RunControl
from lowmem_tune.train.run_files import RunFilesSink
from lowmem_tune.train.schedule import lr_at

LOCAL_TOKENIZER_VOCAB = 512


@dataclass
class RunOutcome:
    status: str  # completed, stopped, failed
    step: int
    exit_code: int
    final_dir: Path | None = None


class NonFiniteLoss(RuntimeError):
    pass


def run_training(profile: Profile, resume: bool, sink: EventSink, control: RunControl | None = None) -> RunOutcome:
    """Run a profile to the end (or to a stop request). Emits events to `sink` and the run files."""
    control = control or RunControl()
    run_dir = Path(profile.output.dir)
    checkpoints_dir = run_dir / "checkpoints"
    resume_from = _check_output_dir(run_dir, checkpoints_dir, resume)

    device = pick_device(profile.hardware.device, profile.hardware.gpu_index)
    dtype = resolve_dtype(profile.model.dtype, device)
    if device.type == "cpu":
        # Denormal floats (tiny second moments in bitsandbytes' CPU kernels) made 8-bit AdamW steps
        # 40x slower after a few dozen steps; flushing them to zero changes nothing we can measure.
        torch.set_flush_denormal(True)
    torch.manual_seed(profile.train.seed)
    resolved = resolve_model(profile.model.name)

    # ---- data and tokenizer
    examples = load_examples(profile.data)
    train_examples, heldout_examples = split_heldout(examples, profile.data.heldout, profile.train.seed)
    tokenizer = _tokenizer_for(profile, resolved, run_dir, [e.prompt + e.response for e in train_examples])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_items, heldout_items = (
        tokenize_examples(exs, tokenizer, profile.data.max_seq_len, profile.data.train_on_prompt, profile.data.packing)
        for exs in (train_examples, heldout_examples)
    )
    if len(train_items) < profile.train.micro_batch_size:
        raise UserError(
            f"data: {len(train_items)} training examples are fewer than train.micro_batch_size "
            f"({profile.train.micro_batch_size}); lower the batch or add data"
        )
    stream = BatchStream(train_items, profile.train.micro_batch_size, profile.train.seed, profile.data.shuffle, pad_id)

    # ---- model and strategy
    model = load_model(resolved, profile.model.init, dtype, device, profile.model.attn_implementation,
                       seed=profile.train.seed)
    strategy = build_strategy(profile)
    files = RunFilesSink(run_dir, resume_from.step if resume_from else None)
    events = FanOut(sink, files)
    ctx = StrategyContext(
        device=device, dtype=dtype, run_dir=run_dir, model_id=_model_identity(profile, resolved),
        calibration_batches=lambda n, length: calibration_sequences(train_items, n, length), events=events,
    )
    try:
        model = strategy.prepare_model(model, ctx)
        if profile.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        eval_results: dict[str, Any] = {"baseline": None, "final": None}
        if profile.eval.tasks and profile.eval.baseline and resume_from is None:
            eval_results["baseline"] = _evaluate(profile, model, tokenizer, events, "baseline")
            write_json_atomic(run_dir / "eval.json", eval_results)
        updater = strategy.build_updater(model, ctx)
        start_step = 0
        if resume_from is not None:
            state = load_checkpoint(resume_from, model)
            updater.load_state_dict(state["updater"])
            strategy.load_state_dict(state["strategy"])
            stream.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            start_step = int(state["step"])
            eval_results = state.get("eval_results", eval_results)
            events.emit(Info(f"resumed from {resume_from.path} at step {start_step}"))
        write_text_atomic(run_dir / "profile.yaml", profile.to_yaml())

        cuda = device.type == "cuda"
        planned = _planned_peak(profile, device, dtype)
        events.emit(RunStarted(
            run_dir=str(run_dir), model=resolved.name, strategy=profile.strategy.name, device=str(device),
            gpu_name=torch.cuda.get_device_name(device) if cuda else None, total_steps=profile.train.max_steps,
            start_step=start_step, num_layers=model.config.num_hidden_layers, planned_peak_bytes=planned,
            gpu_total_bytes=torch.cuda.get_device_properties(device).total_memory if cuda else None,
            gpu_nvml_index=nvml_index_of_torch_device(device.index) if cuda else None,
            strategy_info=strategy.describe(),
        ))

        def checkpoint(step: int) -> None:
            began = time.perf_counter()
            state = {
                "step": step, "updater": updater.state_dict(), "strategy": strategy.state_dict(),
                "data": stream.state_dict(), "rng": rng_state(), "eval_results": eval_results,
            }
            path = save_checkpoint(checkpoints_dir, step, model, state, profile.train.keep_checkpoints)
            events.emit(CheckpointSaved(step, str(path), time.perf_counter() - began))

        step = start_step
        try:
            step = _loop(profile, model, strategy, updater, stream, heldout_items, pad_id, device, events,
                         control, start_step, checkpoint)
        except NonFiniteLoss as err:
            events.emit(RunFinished("failed", step, f"{err}; the last good checkpoint is kept in {checkpoints_dir}"))
            return RunOutcome("failed", step, 1)
        except torch.cuda.OutOfMemoryError:
            total = torch.cuda.get_device_properties(device).total_memory
            predicted = f"the plan predicts {planned / 2**30:.1f} GiB" if planned else "no plan estimate"
            message = (
                f"CUDA out of memory ({predicted} for this profile; the GPU has {total / 2**30:.1f} GiB, "
                f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB was allocated at the peak) — see "
                "`lowmem-tune plan`, then lower train.micro_batch_size or data.max_seq_len, turn on "
                "train.activation_checkpointing, or lower strategy.rank / strategy.sampled_layers"
            )
            events.emit(RunFinished("failed", step, message))
            return RunOutcome("failed", step, 1)
        finally:
            updater.close()

        if control.abort_requested:
            events.emit(RunFinished("stopped", step, "aborted"))
            return RunOutcome("stopped", step, 130)
        if step < profile.train.max_steps:
            events.emit(RunFinished("stopped", step, f"stopped at step {step}; continue with --resume"))
            return RunOutcome("stopped", step, 0)

        final_dir = None
        if profile.output.save_final:
            final_dir = run_dir / "final"
            _save_final(strategy, model, tokenizer, final_dir)
            events.emit(Info(f"final model saved to {final_dir}"))
        if profile.eval.tasks:
            eval_results["final"] = _evaluate(profile, model, tokenizer, events, "final")
            write_json_atomic(run_dir / "eval.json", eval_results)
        events.emit(RunFinished("completed", step, "", str(final_dir) if final_dir else None))
        return RunOutcome("completed", step, 0, final_dir)
    finally:
        files.close()


def _loop(profile: Profile, model, strategy, updater, stream: BatchStream, heldout_items, pad_id: int,
          device: torch.device, events: EventSink, control: RunControl, start_step: int, checkpoint) -> int:
    """Optimizer steps from `start_step` to `max_steps`; returns the number of steps completed."""
    t = profile.train
    process = psutil.Process()
    began = time.perf_counter()
    tokens_seen = 0
    last_saved = start_step
    step = start_step
    while step < t.max_steps and not (control.stop_requested or control.abort_requested):
        step_began = time.perf_counter()
        strategy.on_step_start(step, model, updater)
        model.train()
        loss_sum, step_tokens = 0.0, 0
        for _ in range(t.gradient_accumulation):
            batch = {k: v.to(device, non_blocking=True) for k, v in stream.next_batch().items()}
            loss = model(**batch).loss
            (loss / t.gradient_accumulation).backward()
            loss_sum += loss.item()
            step_tokens += int(batch["attention_mask"].sum())
        loss_value = loss_sum / t.gradient_accumulation
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"loss became {loss_value} at step {step + 1}; lower train.lr or check the data")
        lr = lr_at(step, base_lr=t.lr, max_steps=t.max_steps, warmup_steps=t.warmup_steps,
                   scheduler=t.scheduler, min_lr_ratio=t.min_lr_ratio)
        updater.set_lr(lr)
        grad_norm = updater.step()
        step += 1

        now = time.perf_counter()
        tokens_seen += step_tokens
        done_here = step - start_step
        metrics: dict[str, Any] = {
            "step": step, "total_steps": t.max_steps, "epoch": round(stream.epoch_progress, 4),
            "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
            "tokens_per_s": step_tokens / max(now - step_began, 1e-9), "elapsed_s": now - began,
            "eta_s": (now - began) / done_here * (t.max_steps - step),
            "percentage": round(100.0 * step / t.max_steps, 2),
        }
        metrics.update(_memory_metrics(device, process))
        metrics.update(strategy.step_metrics())
        events.emit(StepMetrics(metrics))

        if heldout_items and (step % t.eval_every == 0 or step == t.max_steps):
            events.emit(EvalLoss(step, _eval_loss(model, heldout_items, t.micro_batch_size, pad_id, device,
                                                  t.eval_batches)))
        wants_save = step % t.save_every == 0 or control.take_checkpoint_request()
        if wants_save or (control.stop_requested and step != last_saved):
            checkpoint(step)
            last_saved = step
    if control.stop_requested and step != last_saved:
        checkpoint(step)
    return step


def _planned_peak(profile: Profile, device: torch.device, dtype: torch.dtype) -> int | None:
    """What `plan` predicts for this profile, shown beside the measured memory (GPU runs only)."""
    if device.type != "cuda":
        return None
    from lowmem_tune.planner.estimate import estimate_profile

    try:
        return estimate_profile(profile, torch.finfo(dtype).bits // 8).total
    except (UserError, KeyError, ValueError):  # an architecture the planner cannot summarize
        return None


def _memory_metrics(device: torch.device, process: psutil.Process) -> dict[str, int]:
    if device.type == "cuda":
        return {"cuda_allocated": torch.cuda.memory_allocated(device), "cuda_peak": torch.cuda.max_memory_allocated(device),
                "cuda_reserved": torch.cuda.memory_reserved(device)}
    return {"rss": process.memory_info().rss}


@torch.no_grad()
def _eval_loss(model, items, batch_size: int, pad_id: int, device: torch.device, max_batches: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(items, batch_size, pad_id, max_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _evaluate(profile: Profile, model, tokenizer, events: EventSink, stage: str) -> dict[str, Any]:
    from lowmem_tune.evaluation import evaluate_tasks

    events.emit(Info(f"{stage} evaluation: {', '.join(profile.eval.tasks)}"))
    results = evaluate_tasks(
        model, tokenizer, profile.eval.tasks, limit=profile.eval.limit, num_fewshot=profile.eval.num_fewshot,
        batch_size=profile.eval.batch_size, data_files=profile.eval.data_files,
    )
    events.emit(EvalResult(stage, results))
    return results


def _save_final(strategy, model, tokenizer: PreTrainedTokenizerBase, final_dir: Path) -> None:
    tmp = final_dir.with_name(f".{final_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if activation_checkpointing_enabled(model):
        disable_activation_checkpointing(model)  # the training is over; generation wants the cache
    model.config.use_cache = True
    strategy.save_final(model, tmp)
    tokenizer.save_pretrained(tmp)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp.rename(final_dir)


def _tokenizer_for(profile: Profile, resolved: ResolvedModel, run_dir: Path, texts: list[str]) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a random-init model without one gets a small tokenizer trained on the
    run's data, saved in the run directory so a resumed run uses the very same one."""
    source = profile.model.tokenizer or (resolved.pretrained_path if profile.model.init == "pretrained" else None)
    if source is not None:
        tokenizer = load_tokenizer(source)
    else:
        saved = run_dir / "tokenizer"
        if (saved / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(str(saved))
        else:
            vocab = min(LOCAL_TOKENIZER_VOCAB, resolved.config.vocab_size)
            tokenizer = train_local_tokenizer(texts, vocab)
            tokenizer.save_pretrained(saved)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > resolved.config.vocab_size:
        raise UserError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {resolved.config.vocab_size}"
        )
    return tokenizer


def _model_identity(profile: Profile, resolved: ResolvedModel) -> str:
    if profile.model.init == "random":
        return f"{resolved.name}-random-seed{profile.train.seed}"
    return f"{resolved.pretrained_path}@{profile.model.revision or 'main'}"


def _check_output_dir(run_dir: Path, checkpoints_dir: Path, resume: bool):
    remove_partial_writes(checkpoints_dir)
    latest = latest_checkpoint(checkpoints_dir)
    if resume:
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {checkpoints_dir} (start without --resume)")
        return latest
    if latest is not None or (run_dir / "final").exists():
        raise UserError(
            f"output.dir {run_dir} already holds a run; continue it with --resume, or choose another "
            "output.dir (--set output.dir=...)"
        )
    return None
