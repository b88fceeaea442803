"""The strategy interface: how a finetuning method plugs into the training loop.

A strategy decides what is trainable (and may rewrite the model, as WeLore does), builds the
`Updater` that changes the weights, acts at optimizer-step boundaries (LISA / OwLore resample
layers there), and says what goes into a checkpoint and into each step's metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from lowmem_tune.events import EventSink, Info
from lowmem_tune.layers import decoder_layers, layer_linears
from lowmem_tune.optim import LOW_RANK_OPTIMIZERS, TrainableParameters, Updater, build_updater
from lowmem_tune.profile import Profile
from lowmem_tune.quantize import dense_state_dict, int8_layers, quantize_decoder
from lowmem_tune.resources import cache_dir as default_cache_dir


class _NullSink:
    def emit(self, event: Any) -> None:
        pass


@dataclass
class StrategyContext:
    """What a strategy may use besides the model: where to cache, data for calibration, events."""

    device: torch.device
    dtype: torch.dtype
    run_dir: Path | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    calibration_batches: Callable[[int, int], Iterator[torch.Tensor]] | None = None
    """calibration_batches(n_sequences, seq_len) yields input_ids tensors from the run's data."""
    events: EventSink = field(default_factory=_NullSink)
    fake: bool = False
    """True under `plan --verify` (FakeTensorMode): no real values, skip data-dependent work."""
    average: Callable[[list[torch.Tensor]], None] | None = None
    """With several processes: averages tensors across them in place (GaLore's low-rank state)."""
    main: bool = True
    """Whether this process writes shared files (the run directory, caches): process 0 of several,
    as transformers' save_pretrained, which writes nothing on the others."""

    def info(self, message: str) -> None:
        self.events.emit(Info(message))


class Strategy(ABC):
    """A method: what trains (`prepare_model`), through which optimizer (`optimizer`, over the
    parameters `parameter_groups` returns), and what it does between steps."""

    name: ClassVar[str]

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.cfg = profile.strategy

    def prepare_model(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        """Rewrite the model if the method needs to and set requires_grad. Default: all trainable,
        but embeddings, final norm and lm_head when `train_embeddings: false`."""
        self.quantize(model, ctx)
        model.requires_grad_(True)
        if self.cfg.train_embeddings is False:
            for module in embedding_modules(model):
                module.requires_grad_(False)
        return model

    @property
    @abstractmethod
    def optimizer(self) -> str:
        """Which optimizer updates the weights: one of optim.OPTIMIZERS."""

    def parameter_groups(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(matrices through GaLore or APOLLO, everything else) that may train; frozen ones may be included."""
        params = trainable_parameters(model)
        if self.optimizer not in LOW_RANK_OPTIMIZERS:
            return [], params
        matrices = galore_matrices(model)
        chosen = {id(p) for p in matrices}
        return matrices, [p for p in params if id(p) not in chosen]

    def embedding_matrices(self, model: nn.Module, others: list[nn.Parameter]) -> list[nn.Parameter]:
        """The embedding and head weights among `others` that train through GaLore at
        `strategy.embedding_rank` (none when it is null)."""
        if getattr(self.cfg, "embedding_rank", None) is None or self.optimizer != "galore":
            return []
        weights = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                   if m is not None}  # tied: one parameter
        return [p for p in others if id(p) in weights]

    @property
    def loads_on_cpu(self) -> bool:
        """Whether a pretrained checkpoint should be loaded on the CPU, for `prepare_model` to move
        it to the device in smaller pieces (INT8 weights a layer at a time; WeLore compressed)."""
        return getattr(self.cfg, "weight_bits", 16) == 8

    def quantize(self, model: nn.Module, ctx: StrategyContext) -> None:
        """With `weight_bits: 8`, the decoder linears become INT8, a layer at a time as they move
        to the device (a 16-bit model is loaded on the CPU for that; see quantize.py)."""
        if getattr(self.cfg, "weight_bits", 16) == 8 and not int8_layers(model):
            quantize_decoder(model, self.cfg.group_size, ctx.device)

    def build_updater(self, model: nn.Module, ctx: StrategyContext) -> Updater:
        matrices, others = self.parameter_groups(model)
        embeddings = self.embedding_matrices(model, others)
        others = [p for p in others if all(p is not e for e in embeddings)]
        parameters = TrainableParameters(matrices, others, embeddings,
                                         names={p: name for name, p in model.named_parameters()},
                                         stores=int8_layers(model), modules=list(model.modules()))
        return build_updater(self.optimizer, parameters, self.profile, ctx.fake, ctx.info, ctx.average)

    def on_step_start(self, step: int, model: nn.Module, updater: Updater) -> None:
        """Called before the micro-batches of optimizer step `step` (0-based)."""

    def step_metrics(self) -> dict[str, Any]:
        """Strategy fields merged into each metrics.jsonl line (the updater adds its own)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Static facts for the dashboard's strategy panel and OUTPUT/strategy.json."""
        return {"name": self.name}

    def checkpoint_keys(self, model: nn.Module) -> set[str] | None:
        """The model's state_dict keys a checkpoint holds; None: all of them (every weight may have
        changed). Adapter methods keep only the adapters': the frozen base is reloaded."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Strategy state for checkpoints (plain tensors and numbers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        """Write the finetuned model loadable by `from_pretrained` (safetensors); INT8 weights
        are written dequantized, in the compute dtype, so `final/` is a plain transformers model."""
        int8 = int8_layers(model)
        if int8:
            dtype = next(iter(int8)).dtype
            model.save_pretrained(out_dir, state_dict=dense_state_dict(model, dtype), safe_serialization=True)
        else:
            model.save_pretrained(out_dir, safe_serialization=True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params


def galore_matrices(model: nn.Module, include_frozen: bool = False) -> list[nn.Parameter]:
    """The 2-D weights of the nn.Linear projections inside the decoder layers (trainable ones,
    unless `include_frozen`)."""
    return [linear.weight for layer in decoder_layers(model) for linear in layer_linears(layer).values()
            if include_frozen or linear.weight.requires_grad]


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Embeddings, final norm and lm_head: what `train_embeddings` switches."""
    modules = [model.get_input_embeddings(), getattr(model.model, "norm", None), model.get_output_embeddings()]
    return [m for m in modules if m is not None]
