"""Several processes (one GPU each, or CPU processes) training one model: torch.distributed, started
by torchrun — `lowmem-tune run --nproc-per-node N` runs torch.distributed.run itself; a run that
torchrun or `accelerate launch` started reads the usual environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR / MASTER_PORT), so several machines work through torchrun's own
rendezvous flags. NCCL on CUDA, gloo on the CPU.

Data parallelism, exactly: every rank reads the same global micro-batch (micro batch x world size
rows, one seeded order) and trains on its own rows; each rank's loss is its share of the global
mean over target tokens, so the mean of the ranks' gradients is the single-process gradient of
the whole micro-batch. GaLore strategies average their low-rank accumulators, sketches and the
few full gradients once per step (bucketed: World.average_); the others run under
torch's DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from lowmem_tune.errors import UserError, one_line
from lowmem_tune.events import RunFinished
from lowmem_tune.loss import causal_lm_loss
from lowmem_tune.optim import LOW_RANK_OPTIMIZERS, GaLoreUpdater, Updater
from lowmem_tune.profile import LAYER_SAMPLING, Profile
from lowmem_tune.train.checkpoint import STATE_FILE
from lowmem_tune.train.setup import checkpoint_to_resume

BUCKET_BYTES = 64 * 2**20
"""Tensors averaged together in one all-reduce (their concatenation is the only extra memory)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device_type: str) -> None:
        """Join the process group (NCCL for CUDA, gloo for the CPU)."""
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self, what: str, timeout_s: float, fix: str) -> None:
        """Wait until every process is here; a process still missing after `timeout_s` seconds
        ends the run with a message naming `what` it was waiting for and the `fix`."""
        if not self.distributed:
            return
        try:
            dist.barrier(async_op=True).wait(timeout=timedelta(seconds=timeout_s))
        except RuntimeError as err:
            raise UserError(f"process {self.rank} waited {timeout_s:.0f} s for {what} and gave up "
                            f"({one_line(err)}); {fix}") from None

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Average `tensors` across the ranks in place, a bucket of BUCKET_BYTES at a time."""
        if not self.distributed:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for tensor in tensors:
            bucket.append(tensor)
            size += tensor.numel() * tensor.element_size()
            if size >= BUCKET_BYTES:
                _average_bucket(bucket, self.size)
                bucket, size = [], 0
        if bucket:
            _average_bucket(bucket, self.size)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def rows(self, batch: dict[str, torch.Tensor], micro_batch_size: int) -> dict[str, torch.Tensor]:
        """This process's rows of a global micro-batch (all of it in a single process)."""
        if not self.distributed:
            return batch
        return {k: v.narrow(0, self.rank * micro_batch_size, micro_batch_size) for k, v in batch.items()}


@dataclass(frozen=True)
class FailuresOnly:
    """The event sink of every process but the first: silent, except for a failure of its own
    (an out-of-memory on one GPU), which goes to stderr before the launcher stops the others."""

    rank: int

    def emit(self, event: Any) -> None:
        if isinstance(event, RunFinished) and event.status == "failed":
            print(f"process {self.rank}: run failed at step {event.step}: {event.message}", file=sys.stderr, flush=True)


class _Loss(nn.Module):
    """The loss as a module, so DistributedDataParallel runs it (and syncs the gradients it makes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, rows: dict[str, torch.Tensor], targets: int) -> torch.Tensor:
        return causal_lm_loss(self.model, rows, target_count=targets)


def data_parallel_loss(model: nn.Module, updater: Updater, world: World,
                       device: torch.device) -> Callable[[dict[str, torch.Tensor], int, bool], torch.Tensor]:
    """loss(rows, targets, last): this process's share of the micro-batch's mean loss — its rows'
    summed loss over all `targets` of the micro-batch, times the number of processes, whose
    gradients are then averaged. GaLore averages its own state at the step; any other optimizer
    runs under DistributedDataParallel, which synchronizes on the step's last micro-batch."""
    if not world.distributed or isinstance(updater, GaLoreUpdater):
        return lambda rows, targets, last: world.size * causal_lm_loss(model, rows, target_count=targets)
    ddp = nn.parallel.DistributedDataParallel(_Loss(model), device_ids=[device.index] if device.type == "cuda" else None,
                                              gradient_as_bucket_view=True)

    def loss(rows: dict[str, torch.Tensor], targets: int, last: bool) -> torch.Tensor:
        with contextlib.nullcontext() if last else ddp.no_sync():
            return world.size * ddp(rows, targets)

    return loss


def check_distributed(profile: Profile, world: World) -> None:
    """What several processes cannot do, as one-line errors."""
    if not world.distributed:
        return
    s = profile.strategy
    if s.name in LAYER_SAMPLING and s.optimizer not in LOW_RANK_OPTIMIZERS:
        raise UserError(f"strategy {s.name} with optimizer {s.optimizer} runs in one process: its layers change "
                        "requires_grad, which DistributedDataParallel fixes when it starts; use optimizer: galore, "
                        "apollo or apollo-mini")
    if s.svd == "first_micro_batch" and s.name != "full" and s.name != "adamw8bit":
        raise UserError("strategy.svd first_micro_batch takes a basis from one process's gradient; with several "
                        "processes use sketch or exact")


def check_resume_world(state: dict[str, Any], world: World, path: Any) -> None:
    saved = int(state.get("world_size", 1))
    if saved != world.size:
        raise UserError(f"--resume: {path} was written by {saved} process(es), this run has {world.size}; resume with "
                        f"--nproc-per-node {saved} (the data order and each process's rows depend on it)")


def _average_bucket(bucket: list[torch.Tensor], world: int) -> None:
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in bucket:
        by_kind.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for tensors in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat.narrow(0, offset, tensor.numel()).view_as(tensor))
            offset += tensor.numel()


def launch(nproc_per_node: int, argv: list[str], profile: Profile, resume: bool) -> int:
    """Start `nproc_per_node` processes of `lowmem-tune run ARGV` on this machine through torchrun;
    returns the launcher's exit code. What every process would refuse is refused here first, as
    one line, rather than once per process under torchrun's own log."""
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {nproc_per_node}: give at least 1 process")
    if torch.cuda.is_available() and nproc_per_node > torch.cuda.device_count():
        raise UserError(f"--nproc-per-node {nproc_per_node}: this machine has {torch.cuda.device_count()} CUDA "
                        "GPU(s), and each process takes one")
    world = World(size=nproc_per_node)
    check_distributed(profile, world)
    resume_from = checkpoint_to_resume(Path(profile.output.dir), resume)
    if resume_from is not None:  # mapped, not read: only world_size is looked at
        state = torch.load(resume_from.path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        check_resume_world(state, world, resume_from.path)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun sets OMP_NUM_THREADS=1 (with a banner) unless told: share the cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    args = torchrun.get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc_per_node), "--module", "lowmem_tune", "run", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as err:  # the failing process printed its own one-line message
        exit_code = min(err.failures.values(), key=lambda f: f.timestamp).exitcode if err.failures else 1
        print(f"lowmem-tune: a process stopped with exit code {exit_code}; the others were stopped", file=sys.stderr)
        return exit_code if exit_code > 0 else 1
    except SignalException:  # Ctrl-C: torchrun passed it on, and the processes checkpointed and stopped
        return 130
    return 0
