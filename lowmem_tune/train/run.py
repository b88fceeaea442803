"""The training run, top to bottom: `setup()`, `train()` (the loop over optimizer steps, with
checkpoints and the held-out loss), `finish()` (final model and evaluation), `cleanup()`.

One optimizer step: the strategy acts at the boundary (LISA / OwLore resample layers), k
micro-batches run forward and backward, the updater steps once, and the loss, the gradient norm
and whatever else the updater measured come to the host in one synchronization.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from lowmem_tune.atomic import atomic_directory, write_json_atomic, write_text_atomic
from lowmem_tune.catalog import resolve_model
from lowmem_tune.data import calibration_sequences, eval_batches
from lowmem_tune.errors import UserError, one_line
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
from lowmem_tune.hardware import nvml_index_of_torch_device
from lowmem_tune.loss import IGNORE_INDEX, causal_lm_loss, target_positions
from lowmem_tune.modeling import (
    activation_checkpointing_enabled,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    load_model,
    pick_device,
    quiet_library_progress,
    resolve_dtype,
)
from lowmem_tune.optim import SVDFailure
from lowmem_tune.profile import Profile
from lowmem_tune.strategies import StrategyContext, build_strategy
from lowmem_tune.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lowmem_tune.train.control import RunControl
from lowmem_tune.train.distributed import FailuresOnly, World, check_distributed, check_resume_world, data_parallel_loss
from lowmem_tune.train.run_files import RunFilesSink
from lowmem_tune.train.schedule import lr_at
from lowmem_tune.train.setup import checkpoint_to_resume, prepare_data


@dataclass
class RunOutcome:
    status: str  # completed, stopped, failed
    step: int
    """Steps completed; for a failed run, the step that failed."""
    exit_code: int
    final_dir: Path | None = None


BASELINE_WAIT_S = 6 * 3600
"""How long the other processes wait for process 0's baseline evaluation before they give up."""


class NonFiniteLoss(RuntimeError):
    pass


def run_training(profile: Profile, resume: bool, sink: EventSink, control: RunControl | None = None) -> RunOutcome:
    """Run a profile to the end (or to a stop request). Emits events to `sink` and the run files."""
    run = TrainingRun(profile, resume, sink, control or RunControl())
    try:
        run.setup()
        return run.train()
    except BaseException as err:  # setup, final evaluation, saving: the run still ends, with the reason
        run.end_on(err)
        raise
    finally:
        run.cleanup()


class TrainingRun:
    """One run of a profile: the model, strategy, updater, data stream, events and current step."""

    def __init__(self, profile: Profile, resume: bool, sink: EventSink, control: RunControl) -> None:
        self.profile, self.control = profile, control
        self.run_dir = Path(profile.output.dir)
        self.resume_from = checkpoint_to_resume(self.run_dir, resume)
        self.sink = sink
        self.files: RunFilesSink | None = None
        self.updater = None
        self.step = 0
        self.eval_results: dict[str, Any] = {"baseline": None, "final": None}
        self.world = World.from_env()
        self.stopping = self.aborting = self.checkpoint_asked = False
        self.ended = False
        """A RunFinished has been emitted (`_end`)."""
        """Requests every process agreed on at the last step (one stops, all stop at the same step)."""

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        p = self.profile
        quiet_library_progress()
        world = self.world
        self.device = pick_device(p.hardware.device, world.local_rank if world.distributed else p.hardware.gpu_index)
        world.start(self.device.type)
        if not world.main:
            self.sink = FailuresOnly(world.rank)  # one process speaks and writes the run directory
        if world.main:  # before anything can fail, so that `monitor` sees how the run ended
            self.files = RunFilesSink(self.run_dir, self.resume_from.step if self.resume_from else None)
        self.events = FanOut(self.sink, *([self.files] if self.files else []))
        self.dtype = resolve_dtype(p.model.dtype, self.device)
        if self.device.type == "cpu":
            # Denormal floats (tiny second moments in bitsandbytes' CPU kernels) made 8-bit AdamW steps
            # 40x slower after a few dozen steps; flushing them to zero changes nothing we can measure.
            torch.set_flush_denormal(True)
        torch.manual_seed(p.train.seed)
        resolved = resolve_model(p.model.name, p.model.revision)
        self.data = prepare_data(p, resolved, self.run_dir, world.size, world.main)
        if self.data.truncation_note:
            self.events.emit(Info(self.data.truncation_note))
        if p.eval.tasks or p.eval.data_files:  # a typo fails now, not after training
            from lowmem_tune.evaluation.runner import chat_renderer, check_tasks

            check_tasks(p.eval.tasks, p.eval.data_files, "eval.data_files")
            chat_renderer(self.data.tokenizer, p.eval.apply_chat_template, p.eval.fewshot_as_multiturn,
                          "eval.apply_chat_template")
        self.stream = self.data.stream  # global micro-batches: every process takes its rows
        self.strategy = build_strategy(p)
        check_distributed(p, world)
        load_on = torch.device("cpu") if self.strategy.loads_on_cpu and p.model.init == "pretrained" else self.device
        self.model = load_model(resolved, p.model.init, self.dtype, load_on, p.model.attn_implementation,
                                seed=p.train.seed)
        train_items = self.data.train_items
        ctx = StrategyContext(
            device=self.device, dtype=self.dtype, run_dir=self.run_dir,
            calibration_batches=lambda n, length: calibration_sequences(train_items, n, length), events=self.events,
            average=world.average_ if world.distributed else None, main=world.main,
        )
        self.model = self.strategy.prepare_model(self.model, ctx)
        if p.train.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if p.eval.tasks and p.eval.baseline and self.resume_from is None:
            if world.main:
                self.eval_results["baseline"] = self.evaluate("baseline")
                write_json_atomic(self.run_dir / "eval.json", self.eval_results)
            world.barrier("process 0's baseline evaluation", BASELINE_WAIT_S,
                          "evaluate fewer examples (eval.limit) or set eval.baseline: false")
        self.updater = self.strategy.build_updater(self.model, ctx)
        self.loss = data_parallel_loss(self.model, self.updater, world, self.device)
        if self.resume_from is not None:
            state = load_checkpoint(self.resume_from, self.model, self.strategy.checkpoint_keys(self.model))
            check_resume_world(state, world, self.resume_from.path)
            try:
                self.updater.load_state_dict(state["updater"])
                self.strategy.load_state_dict(state["strategy"])
                self.stream.load_state_dict(state["data"])
            except (KeyError, ValueError, RuntimeError, TypeError) as err:  # another optimizer's state
                raise UserError(
                    f"--resume: {self.resume_from.path} holds the state of another optimizer or strategy than this "
                    f"run builds ({one_line(err, 100)}); resume with the profile it was written with "
                    f"({self.run_dir / 'profile.yaml'}): same strategy, model.dtype (here "
                    f"{str(self.dtype).removeprefix('torch.')}) and strategy.rounding"
                ) from None
            set_rng_state(state["rng"])
            self.step = int(state["step"])
            self.eval_results = state.get("eval_results", self.eval_results)
            self.events.emit(Info(f"resumed from {self.resume_from.path} at step {self.step}"))
        if world.main:
            write_text_atomic(self.run_dir / "profile.yaml", p.to_yaml())
        self.planned_peak = self._planned_peak()
        cuda = self.device.type == "cuda"
        self.events.emit(RunStarted(
            run_dir=str(self.run_dir), model=resolved.name, strategy=p.strategy.name, device=str(self.device),
            gpu_name=torch.cuda.get_device_name(self.device) if cuda else None, total_steps=p.train.max_steps,
            start_step=self.step, num_layers=self.model.config.num_hidden_layers, planned_peak_bytes=self.planned_peak,
            gpu_total_bytes=torch.cuda.get_device_properties(self.device).total_memory if cuda else None,
            gpu_nvml_index=nvml_index_of_torch_device(self.device.index) if cuda else None,
            strategy_info=self.strategy.describe(), dtype=str(self.dtype).removeprefix("torch."),
        ))

    # ------------------------------------------------------------------ the loop
    def train(self) -> RunOutcome:
        t = self.profile.train
        began, last_saved = time.perf_counter(), self.step
        start_step = self.step
        self._read_requests_between_steps()  # a stop asked during setup: no step at all
        try:
            while self.step < t.max_steps and not (self.stopping or self.aborting):
                metrics = self.train_step()
                done = self.step - start_step
                elapsed = time.perf_counter() - began
                metrics.update(elapsed_s=elapsed, eta_s=elapsed / done * (t.max_steps - self.step))
                self.events.emit(StepMetrics(metrics))
                if self.data.heldout_items and (self.step % t.eval_every == 0 or self.step == t.max_steps) \
                        and self.world.main:
                    self.events.emit(EvalLoss(self.step, self.eval_loss()))
                self._read_requests_between_steps()
                if self.step % t.save_every == 0 or self.checkpoint_asked or (self.stopping and self.step != last_saved):
                    self.save_checkpoint()
                    last_saved = self.step
        except (NonFiniteLoss, SVDFailure) as err:
            kept = latest_checkpoint(self.run_dir / "checkpoints")
            return self._failed(f"{err}; " + (f"the last good checkpoint is {kept.path} (step {kept.step})" if kept
                                              else "no checkpoint had been written yet"))
        except torch.cuda.OutOfMemoryError:
            return self._failed(self._out_of_memory_message())
        if self.aborting:
            self._end("stopped", self.step, "aborted")
            return RunOutcome("stopped", self.step, 130)
        if self.step < t.max_steps:
            self._end("stopped", self.step, f"stopped at step {self.step}; continue with --resume")
            return RunOutcome("stopped", self.step, 0)
        return self.finish()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics (one host synchronization)."""
        t = self.profile.train
        step_began = time.perf_counter()
        self.strategy.on_step_start(self.step, self.model, self.updater)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.promote_types(self.dtype, torch.float32))
        tokens = 0
        for micro in range(t.gradient_accumulation):
            batch = self.stream.next_batch()  # on the host: counting needs no device synchronization
            tokens += int(batch["attention_mask"].sum())
            targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            rows = self.world.rows(batch, t.micro_batch_size)
            rows["target_positions"] = target_positions(rows["labels"])
            rows = {k: v.to(self.device, non_blocking=True) for k, v in rows.items()}
            loss = self.loss(rows, targets, last=micro == t.gradient_accumulation - 1)
            (loss / t.gradient_accumulation).backward()
            loss_sum += loss.detach()
        lr = lr_at(self.step, base_lr=t.lr, max_steps=t.max_steps, warmup_steps=t.warmup_steps,
                   scheduler=t.scheduler, min_lr_ratio=t.min_lr_ratio)
        self.updater.set_lr(lr)
        host = self._synchronize(loss_sum / t.gradient_accumulation, self.updater.step())
        if not math.isfinite(host["loss"]):
            raise NonFiniteLoss(f"loss became {host['loss']} at step {self.step + 1}; lower train.lr or check the data")
        self.step += 1
        seconds = time.perf_counter() - step_began
        return {
            "step": self.step, "total_steps": t.max_steps, "epoch": round(self.stream.epoch_progress, 4),
            **host, "lr": lr, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
            "percentage": round(100.0 * self.step / t.max_steps, 2),
            **self._memory_metrics(), **self.updater.metrics(), **self.strategy.step_metrics(),
        }

    def _synchronize(self, loss: torch.Tensor, measured: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's one host synchronization: the loss (averaged over processes with the stop,
        abort and checkpoint requests, so that all agree) and the updater's figures."""
        c = self.control
        shared = torch.stack([loss.float(), *(torch.tensor(float(flag), device=self.device) for flag in
                                               (c.stop_requested, c.abort_requested, c.take_checkpoint_request()))])
        self.world.sum_(shared)
        local = [v.float().to(self.device).reshape(1) for v in measured.values()]
        values = torch.cat([shared, *local]).tolist()
        loss_value, stop, abort, checkpoint = values[:4]
        self.stopping, self.aborting, self.checkpoint_asked = stop > 0, abort > 0, checkpoint > 0
        return {"loss": loss_value / self.world.size, **dict(zip(measured, values[4:]))}

    def _read_requests_between_steps(self) -> None:
        """One process takes a stop or checkpoint asked after a step at that step. Several take
        them at the next step's synchronization instead, so that all act at the same step."""
        if self.world.size == 1:
            c = self.control
            self.stopping |= c.stop_requested
            self.aborting |= c.abort_requested
            self.checkpoint_asked |= c.take_checkpoint_request()

    def save_checkpoint(self) -> None:
        if not self.world.main:  # every process holds the same state; the first one writes it
            return
        began = time.perf_counter()
        state = {
            "step": self.step, "updater": self.updater.state_dict(), "strategy": self.strategy.state_dict(),
            "data": self.stream.state_dict(), "rng": rng_state(), "eval_results": self.eval_results,
            "world_size": self.world.size,
        }
        path = save_checkpoint(self.run_dir / "checkpoints", self.step, self.model, state,
                               self.profile.train.keep_checkpoints, self.strategy.checkpoint_keys(self.model))
        self.events.emit(CheckpointSaved(self.step, str(path), time.perf_counter() - began))

    # ------------------------------------------------------------------ the end
    def finish(self) -> RunOutcome:
        final_dir = None
        if not self.world.main:
            return RunOutcome("completed", self.step, 0)
        if self.profile.output.save_final:
            final_dir = self.run_dir / "final"
            self._save_final(final_dir)
            self.events.emit(Info(f"final model saved to {final_dir}"))
        if self.profile.eval.tasks:
            self.eval_results["final"] = self.evaluate("final")
            write_json_atomic(self.run_dir / "eval.json", self.eval_results)
        self._end("completed", self.step, "", str(final_dir) if final_dir else None)
        return RunOutcome("completed", self.step, 0, final_dir)

    def cleanup(self) -> None:
        if self.updater is not None:
            self.updater.close()
        if self.files is not None:
            self.files.close()
        self.world.stop()

    def _end(self, status: str, step: int, message: str, final_dir: str | None = None) -> None:
        self.events.emit(RunFinished(status, step, message, final_dir))
        self.ended = True

    def end_on(self, err: BaseException) -> None:
        """A run that raised (in setup, the final evaluation, saving, or an abort) still ends: one
        RunFinished with the reason and the last good checkpoint, unless it has ended already."""
        if self.ended or not hasattr(self, "events"):
            return
        if isinstance(err, KeyboardInterrupt):
            reason = "aborted"
        else:
            reason = f"{type(err).__name__}: {one_line(err)}" if not isinstance(err, UserError) else str(err)
        kept = latest_checkpoint(self.run_dir / "checkpoints")
        where = f"the last good checkpoint is {kept.path} (step {kept.step})" if kept else "no checkpoint was written"
        self._end("stopped" if isinstance(err, KeyboardInterrupt) else "failed", self.step, f"{reason}; {where}")

    def _failed(self, message: str) -> RunOutcome:
        failed_at = self.step + 1  # the step being computed when it failed
        self._end("failed", failed_at, message)
        return RunOutcome("failed", failed_at, 1)

    # ------------------------------------------------------------------ pieces
    def evaluate(self, stage: str) -> dict[str, Any]:
        from lowmem_tune.evaluation import evaluate_tasks

        e = self.profile.eval
        results = evaluate_tasks(self.model, self.data.tokenizer, e.tasks, limit=e.limit, num_fewshot=e.num_fewshot,
                                 batch_size=e.batch_size, data_files=e.data_files, add_bos=e.add_bos,
                                 apply_chat_template=e.apply_chat_template, fewshot_as_multiturn=e.fewshot_as_multiturn,
                                 chat_key="eval.apply_chat_template")
        self.events.emit(EvalResult(stage, results))
        return results

    @torch.no_grad()
    def eval_loss(self) -> float:
        was_training = self.model.training
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        t = self.profile.train
        for batch in eval_batches(self.data.heldout_items, t.micro_batch_size, self.data.pad_id, t.eval_batches):
            batch["target_positions"] = target_positions(batch["labels"])
            n = batch["target_positions"].numel()
            batch = {k: v.to(self.device) for k, v in batch.items()}
            total += causal_lm_loss(self.model, batch) * n  # the model itself: no collective in evaluation
            count += n
        self.model.train(was_training)
        return float(total) / max(count, 1)

    def _save_final(self, final_dir: Path) -> None:
        if activation_checkpointing_enabled(self.model):
            disable_activation_checkpointing(self.model)  # the training is over; generation wants the cache
        self.model.config.use_cache = True
        with atomic_directory(final_dir, replace=True) as tmp:  # a full disk leaves the old final/ whole
            self.strategy.save_final(self.model, tmp)
            self.data.tokenizer.save_pretrained(tmp)

    def _planned_peak(self) -> int | None:
        """What `plan` predicts for this profile, shown beside the measured memory (GPU runs only)."""
        if self.device.type != "cuda":
            return None
        from lowmem_tune.planner.estimate import estimate_profile

        try:
            return estimate_profile(self.profile, torch.finfo(self.dtype).bits // 8).total
        except (UserError, KeyError, ValueError):  # an architecture the planner cannot summarize
            return None

    def _memory_metrics(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {"cuda_allocated": torch.cuda.memory_allocated(self.device),
                    "cuda_peak": torch.cuda.max_memory_allocated(self.device),
                    "cuda_reserved": torch.cuda.memory_reserved(self.device)}
        return {"rss": psutil.Process().memory_info().rss}

    def _out_of_memory_message(self) -> str:
        predicted = f"the plan predicts {self.planned_peak / 2**30:.1f} GiB" if self.planned_peak else "no plan estimate"
        where = ""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            peak = torch.cuda.max_memory_allocated(self.device)
            where = f"; the GPU has {total / 2**30:.1f} GiB, {peak / 2**30:.1f} GiB was allocated at the peak"
        return (
            f"CUDA out of memory at step {self.step + 1} ({predicted} for this profile{where}) — see "
            "`lowmem-tune plan`, then lower train.micro_batch_size or data.max_seq_len, turn on "
            "train.activation_checkpointing, or lower strategy.rank / strategy.sampled_layers"
        )
