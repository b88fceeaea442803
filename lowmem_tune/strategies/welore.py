"""WeLore: compress the model non-uniformly, then train only its low-rank components (LRC-only).

The model is compressed at run start (spectra cached, so a resumed run rebuilds the very same
architecture) or loaded from a directory `lowmem-tune compress` wrote. Trainable: the LRC factors
and, with `strategy.train_norms`, the RMSNorm weights. Embeddings, lm_head and the dense N-LRC
matrices are frozen. Under `plan --verify` (fake tensors) no SVD runs: the ranks come from
`assumed_ranks`, the architecture-only estimate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_tune.atomic import atomic_directory, write_json_atomic
from lowmem_tune.cache import cache_entry, tensors_fingerprint
from lowmem_tune.catalog import resolve_model
from lowmem_tune.compress import (
    RankPlan,
    assumed_ranks_of,
    compress_model,
    compressed_ranks,
    install_empty,
    load_compressed,
    lowrank_modules,
    plan_from_ranks,
    record_plan,
    save_compressed,
)
from lowmem_tune.compress.storage import trainable_summary
from lowmem_tune.errors import UserError
from lowmem_tune.layers import is_norm, move_to
from lowmem_tune.strategies.base import Strategy, StrategyContext, trainable_parameters

_SAME_ARCHITECTURE = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
COMPRESSED_CACHE = "welore-models"
"""Beside the spectra in the cache directory: compressed models, by weights, ERR and min_ratio."""


class WeLore(Strategy):
    name = "welore"

    def __init__(self, profile) -> None:
        super().__init__(profile)
        self.plan: RankPlan | None = None
        self.counts: tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------ model

    def prepare_model(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        model = self._compressed(model, ctx)
        self.quantize(model, ctx)  # weight_bits 8: factors and dense matrices, a layer at a time to the device
        model = move_to(model, ctx.device)
        model.requires_grad_(False)
        for module in lowrank_modules(model).values():
            module.requires_grad_(True)
        if self.cfg.train_norms:
            for module in model.modules():
                if is_norm(module):
                    module.requires_grad_(True)
        if self.cfg.train_embeddings:  # off unless asked: WeLore proper freezes them
            model.get_input_embeddings().requires_grad_(True)
            model.get_output_embeddings().requires_grad_(True)
        self.counts = trainable_summary(model)
        summary = self.describe()
        ctx.info(
            f"WeLore: ERR {summary['rank_reduction_achieved']:.3f} (target {self.cfg.rank_reduction}), "
            f"{summary['lrc']} LRC trainable, {summary['n_lrc']} N-LRC frozen; "
            f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,} parameters train"
        )
        if ctx.run_dir is not None and not ctx.fake and ctx.main:
            Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(ctx.run_dir) / "strategy.json", {**summary, "matrices": self.plan.to_dict()["matrices"]})
        return model

    def _compressed(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        """The model with its LRCs factorized, and self.plan describing them."""
        if lowrank_modules(model):  # model.name is a compressed directory: load_model did the work
            self.plan = plan_from_ranks(model, compressed_ranks(model.config), model.config.welore)
            return model
        if self.cfg.compressed_model:
            return self._load_directory(model, ctx)
        recorded = compressed_ranks(model.config)
        if recorded is not None:  # planning a compressed directory from its config alone
            install_empty(model, recorded)
            self.plan = plan_from_ranks(model, recorded, model.config.welore)
            return model
        if ctx.fake:
            self.plan = assumed_ranks_of(model, self.cfg.rank_reduction, self.cfg.min_ratio)
            install_empty(model, self.plan.lrc_ranks)
            record_plan(model, self.plan)
            return model
        return self._compress_dense(model, ctx)

    def _compress_dense(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        """Compress the dense model where it is (the CPU, for a pretrained one: see `loads_on_cpu`;
        each matrix's SVD runs on the device), cache the compressed model, and move it to the
        device: the device never holds the dense model. A second run reads it from the cache."""
        cached = cache_entry(ctx.cache_dir, COMPRESSED_CACHE, tensors_fingerprint(model.state_dict()),
                             rank_reduction=self.cfg.rank_reduction, min_ratio=self.cfg.min_ratio)
        if (cached / "config.json").is_file():
            ctx.info(f"WeLore: the compressed model read from the cache ({cached})")
            model.to("meta")  # free the dense weights before loading the compressed ones
            compressed = load_compressed(cached, ctx.dtype, self._load_device(ctx),
                                         self.profile.model.attn_implementation)
            self.plan = plan_from_ranks(compressed, compressed_ranks(compressed.config), compressed.config.welore)
            return compressed
        if self.profile.model.init == "random":
            ctx.info("WeLore on randomly initialized weights: the spectra are flat, so the ranks carry no structure")
        ctx.info("WeLore: compressing (singular values cached; the compressed model too, after this run)")
        self.plan = compress_model(model, self.cfg.rank_reduction, self.cfg.min_ratio, ctx.cache_dir,
                                   svd_device=ctx.device, progress=False)
        if not ctx.fake and ctx.main:  # another run may have cached it meanwhile: the first copy stays
            with atomic_directory(cached, first_wins=True) as tmp:
                save_compressed(model, self.plan, tmp)
        return model

    @property
    def loads_on_cpu(self) -> bool:
        return True

    def _load_device(self, ctx: StrategyContext) -> torch.device:
        """Where a compressed directory is loaded: the CPU when its matrices are quantized on their
        way to the device (so the device never holds them in 16 bits)."""
        return torch.device("cpu") if self.cfg.weight_bits == 8 else ctx.device

    def _load_directory(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        path = Path(self.cfg.compressed_model).expanduser()
        resolved = resolve_model(str(path))
        recorded = compressed_ranks(resolved.config)
        if resolved.local_dir is None or recorded is None:
            raise UserError(
                f"strategy.compressed_model: {path} is not a directory written by `lowmem-tune compress` "
                "(no `welore` ranks in its config.json)"
            )
        for key in _SAME_ARCHITECTURE:
            if getattr(resolved.config, key, None) != getattr(model.config, key, None):
                raise UserError(
                    f"strategy.compressed_model: {path} has {key}={getattr(resolved.config, key, None)} but "
                    f"model.name gives {getattr(model.config, key, None)}; point model.name at the model it was "
                    "compressed from (or at the compressed directory itself)"
                )
        if ctx.fake:
            install_empty(model, recorded)
            self.plan = plan_from_ranks(model, recorded, resolved.config.welore)
            return model
        model.to("meta")  # the dense weights are replaced: free them before loading the compressed ones
        compressed = load_compressed(path, ctx.dtype, self._load_device(ctx), self.profile.model.attn_implementation)
        self.plan = plan_from_ranks(compressed, recorded, compressed.config.welore)
        return compressed

    # ------------------------------------------------------------------ training

    @property
    def optimizer(self) -> str:
        return self.cfg.optimizer

    def parameter_groups(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """With GaLore: the 2-D factors through it (the projector rank is capped at each factor's
        k), AdamW on the norms; otherwise one optimizer over everything trainable."""
        params = trainable_parameters(model)
        if self.optimizer not in ("galore", "fira"):
            return [], params
        factors = [p for m in lowrank_modules(model).values() for p in m.factors() if p.requires_grad]
        chosen = {id(p) for p in factors}
        return factors, [p for p in params if id(p) not in chosen]

    def describe(self) -> dict[str, Any]:
        if self.plan is None:
            return {"name": self.name, "optimizer": self.cfg.optimizer}
        trainable, total = self.counts
        return {
            "name": self.name,
            "optimizer": self.cfg.optimizer,
            **self.plan.summary(),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "train_norms": self.cfg.train_norms,
            **({"galore_rank": self.cfg.rank, "update_proj_gap": self.cfg.update_proj_gap}
               if self.cfg.optimizer == "galore" else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"lrc_ranks": dict(self.plan.lrc_ranks) if self.plan else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {str(k): int(v) for k, v in state.get("lrc_ranks", {}).items()}
        if self.plan is not None and saved != self.plan.lrc_ranks:
            raise UserError(
                "--resume: the checkpoint was trained with different WeLore ranks than this run chose "
                "(the model, strategy.rank_reduction or strategy.min_ratio changed); start a new output.dir"
            )

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        """The compressed (factorized) model: `run`/`eval` load it; `lowmem-tune merge` makes it dense."""
        save_compressed(model, self.plan, out_dir)

