"""LISA and OwLore: train a few sampled decoder layers at a time, resampled every K steps.

Every K optimizer steps a seeded sampler draws γ layers without replacement (uniformly for LISA,
with p_l ∝ outlier ratio D_l for OwLore). Those layers train; the others are frozen and their
optimizer state is released (dropped, or parked on the CPU with `inactive_state: offload`), so the
state held at any time is that of the γ active layers plus the always-trained parts (embeddings,
final norm, lm_head) — it does not grow with the number of layers ever sampled.

The updater is built over every parameter that may ever train, frozen or not, so a layer frozen
at construction still trains when it is sampled later (LMFlow #726). Sampler state (generator,
active layers, counts) goes into checkpoints, so a resume mid-interval trains the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterable

import torch
from torch import nn

from lowmem_tune.atomic import write_json_atomic
from lowmem_tune.errors import UserError
from lowmem_tune.layers import decoder_layers
from lowmem_tune.optim import LOW_RANK_OPTIMIZERS, Updater
from lowmem_tune.strategies.base import Strategy, StrategyContext, embedding_modules, galore_matrices
from lowmem_tune.strategies.outliers import (
    RANDOM_TOKENS_NOTE,
    OutlierRatios,
    compute_outlier_ratios,
    load_tokenizer,
    random_token_batches,
    read_calibration_file,
    sampling_probabilities,
    text_batches,
)

# --------------------------------------------------------------------------- sampler


def host_tensors() -> ContextManager[Any]:
    """Real tensors even under `plan --verify`'s FakeTensorMode: the sampler's few float64
    probabilities and its draws are host bookkeeping that reads values, never training memory."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


class LayerSampler:
    """Draws `sampled` of len(probabilities) layers without replacement from a seeded generator.

    Successive draws: the first layer with probability p_l, the next from the rest renormalized
    (as numpy's choice(replace=False, p=...) in the OwLore reference). Layers with p_l = 0 are
    never drawn, so at most (number of p_l > 0) layers are active.
    """

    def __init__(self, probabilities: list[float], sampled: int, seed: int) -> None:
        with host_tensors():
            self.probabilities = torch.tensor(probabilities, dtype=torch.float64)
            if self.probabilities.ndim != 1 or len(self.probabilities) == 0 or self.probabilities.sum() <= 0:
                raise ValueError(f"need at least one positive layer probability, got {probabilities}")
            self.sampled = min(sampled, int((self.probabilities > 0).sum()))
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = [0] * len(probabilities)
        self.active: list[int] | None = None
        self.drawn_at: int | None = None
        """The step of the latest draw; a second call for the same step does not redraw."""

    @property
    def num_layers(self) -> int:
        return len(self.probabilities)

    def draw(self, step: int) -> list[int]:
        with host_tensors():
            picked = torch.multinomial(self.probabilities, self.sampled, replacement=False, generator=self.generator)
            self.active = sorted(picked.tolist())
        for index in self.active:
            self.counts[index] += 1
        self.drawn_at = step
        return self.active

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "counts": list(self.counts),
            "active": None if self.active is None else list(self.active),
            "drawn_at": self.drawn_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.counts = list(state["counts"])
        self.active = None if state["active"] is None else list(state["active"])
        self.drawn_at = state["drawn_at"]


# --------------------------------------------------------------------------- strategies


def unique_parameters(modules: Iterable[nn.Module], exclude: Iterable[nn.Parameter] = ()) -> list[nn.Parameter]:
    seen = {id(p) for p in exclude}
    params = []
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


@dataclass
class LayerChoice:
    """What the sampler draws from, and why."""

    probabilities: list[float]
    ratios: OutlierRatios | None = None
    note: str = ""


class LayerSamplingStrategy(Strategy):
    """Shared machinery of LISA and OwLore; subclasses say how layers are weighted."""

    def layer_choice(self, model: nn.Module, ctx: StrategyContext) -> LayerChoice:
        raise NotImplementedError

    @property
    def optimizer(self) -> str:
        return self.cfg.optimizer

    def prepare_model(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        self.quantize(model, ctx)
        layers = decoder_layers(model)
        model.requires_grad_(False)
        self.always_trained = (unique_parameters(embedding_modules(model)) if self.cfg.train_embeddings is not False
                               else [])
        for param in self.always_trained:
            param.requires_grad_(True)
        self.layer_params = [unique_parameters([layer], exclude=self.always_trained) for layer in layers]
        self.choice = self.layer_choice(model, ctx)
        if self.choice.note:
            ctx.info(self.choice.note)
        self.sampler = LayerSampler(self.choice.probabilities, self.cfg.sampled_layers, self.profile.train.seed)
        if self.sampler.sampled < self.cfg.sampled_layers:
            ctx.info(f"{self.name}: only {self.sampler.sampled} layers can be sampled at a time "
                     f"(strategy.sampled_layers is {self.cfg.sampled_layers})")
        self.applied: list[int] = []
        self.run_dir = ctx.run_dir if ctx.main else None  # one process writes strategy.json
        return model

    def parameter_groups(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Every parameter that may train during the run, active now or not (LMFlow #726: a layer
        frozen when the optimizer is built must still train when it is sampled later)."""
        candidates = self.always_trained + [p for params in self.layer_params for p in params]
        if self.optimizer not in LOW_RANK_OPTIMIZERS:
            return [], candidates
        matrices = galore_matrices(model, include_frozen=True)
        chosen = {id(p) for p in matrices}
        return matrices, [p for p in candidates if id(p) not in chosen]

    def on_step_start(self, step: int, model: nn.Module, updater: Updater) -> None:
        drawing = (step % self.cfg.interval == 0 and self.sampler.drawn_at != step) or self.sampler.active is None
        if drawing:
            self.sampler.draw(step)
        if self.sampler.active != self.applied:
            self._apply(self.sampler.active, updater)
        if drawing:
            self.write_summary()

    def _apply(self, active: list[int], updater: Updater) -> None:
        leaving = [i for i in self.applied if i not in active]
        for index in leaving:
            params = self.layer_params[index]
            for param in params:
                param.requires_grad_(False)
            updater.release(params, offload=self.cfg.inactive_state == "offload")
        for index in active:
            for param in self.layer_params[index]:
                param.requires_grad_(True)
        self.applied = list(active)

    def step_metrics(self) -> dict[str, Any]:
        return {"active_layers": list(self.applied)}

    def describe(self) -> dict[str, Any]:
        ratios = self.choice.ratios
        layers = [
            {
                "layer": i,
                "outlier_ratio": None if ratios is None else ratios.ratios[i],
                "outliers": None if ratios is None else ratios.outliers[i],
                "probability": p,
                "times_sampled": self.sampler.counts[i],
            }
            for i, p in enumerate(self.choice.probabilities)
        ]
        info: dict[str, Any] = {
            "name": self.name,
            "sampled_layers": self.sampler.sampled,
            "interval": self.cfg.interval,
            "optimizer": self.cfg.optimizer,
            "inactive_state": self.cfg.inactive_state,
            "train_embeddings": self.cfg.train_embeddings is not False,
            "active_layers": list(self.applied),
            "layers": layers,
        }
        if ratios is not None:
            info.update(outlier_threshold=ratios.threshold, temperature=self.cfg.temperature,
                        calibration=ratios.calibration, calibration_tokens=ratios.tokens)
        if self.choice.note:
            info["note"] = self.choice.note
        return info

    def write_summary(self) -> None:
        """OUTPUT/strategy.json: per-layer ratios, probabilities and sample counts so far."""
        if self.run_dir is not None:
            write_json_atomic(Path(self.run_dir) / "strategy.json", self.describe())

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        self.write_summary()
        super().save_final(model, out_dir)


class LISA(LayerSamplingStrategy):
    """Layerwise Importance Sampled AdamW (Pan et al. 2024): layers sampled uniformly."""

    name = "lisa"

    def layer_choice(self, model: nn.Module, ctx: StrategyContext) -> LayerChoice:
        count = len(decoder_layers(model))
        return LayerChoice([1.0 / count] * count)


class OwLore(LayerSamplingStrategy):
    """Outlier-weighted layer sampling (Li et al. 2024): p_l ∝ D_l^(1/temperature)."""

    name = "owlore"

    def layer_choice(self, model: nn.Module, ctx: StrategyContext) -> LayerChoice:
        count = len(decoder_layers(model))
        if ctx.fake:
            return LayerChoice([1.0 / count] * count, note="owlore: no real values under --verify; sampling uniformly")
        batches, source = self.calibration(model, ctx)
        ratios, hit = compute_outlier_ratios(model, batches, self.cfg.outlier_threshold, source, ctx.cache_dir)
        probabilities = sampling_probabilities(ratios, self.cfg.temperature)
        notes = []
        if hit:
            notes.append("owlore: outlier ratios read from the cache")
        if not any(ratios.outliers):
            notes.append(f"owlore: no layer has a Wanda score above {ratios.threshold:g} x its mean "
                         "(random weights?); sampling layers uniformly, as LISA")
        return LayerChoice(probabilities, ratios, "; ".join(notes))

    def calibration(self, model: nn.Module, ctx: StrategyContext) -> tuple[list[torch.Tensor], str]:
        """calibration_file if set, else the run's training data, else random ids (documented)."""
        n, length = self.cfg.calibration_samples, self.cfg.calibration_seq_len
        if self.cfg.calibration_file is not None:
            from lowmem_tune.catalog import resolve_model

            resolved = resolve_model(self.profile.model.name)
            tokenizer = load_tokenizer(resolved.pretrained_path, self.profile.model.tokenizer)
            if tokenizer is None:
                raise UserError("strategy.calibration_file needs a tokenizer: set model.tokenizer")
            text = read_calibration_file(self.cfg.calibration_file)
            return text_batches(text, tokenizer, n, length), str(self.cfg.calibration_file)
        if ctx.calibration_batches is not None:
            return list(ctx.calibration_batches(n, length)), f"{n} sequences of the training data"
        return random_token_batches(model.config.vocab_size, n, length), RANDOM_TOKENS_NOTE
