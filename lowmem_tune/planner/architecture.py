"""The shapes a memory estimate needs, read from a model built on the meta device.

Building a 7B model on the meta device needs torch and transformers (seconds to import), so the
summaries of the catalog models are generated once into the data file `catalog_shapes.json`
(`python -m lowmem_tune.planner.architecture`) and checked against fresh meta builds by the tests. Any other
model (a local directory, a hub id) is built on the meta device when planned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lowmem_tune.atomic import write_text_atomic
from lowmem_tune.catalog import CATALOG, ModelSpec

CATALOG_SHAPES = Path(__file__).with_name("catalog_shapes.json")


@dataclass(frozen=True)
class LinearShape:
    name: str  # q_proj, ..., down_proj
    out_features: int
    in_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Architecture:
    """A Llama-family decoder: every decoder layer has the same linears and norms."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    params: int
    embedding_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    final_norm_params: int
    layer_norm_params: int  # per decoder layer
    linears: tuple[LinearShape, ...]  # per decoder layer
    activations: dict[str, int]
    """Bytes per token one decoder layer keeps for backward, measured on fake tensors
    (`verify.layer_activation_profile`): trained_D, frozen_D, norms_D and per_position_D."""

    @property
    def layer_params(self) -> int:
        return self.layer_norm_params + sum(lin.numel for lin in self.linears)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        data = dict(data)
        data["linears"] = tuple(LinearShape(**lin) for lin in data["linears"])
        return cls(**data)


def spec_fingerprint(spec: ModelSpec) -> str:
    """Changes whenever a catalog entry's architecture changes (so a stale summary is not used)."""
    text = json.dumps({"model_type": spec.model_type, "config": spec.config}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def summarize(name: str, config: Any) -> Architecture:
    """Build `config` on the meta device and read its shapes (torch and transformers)."""
    from torch import nn

    from lowmem_tune.layers import build_empty_model, decoder_layers, layer_linears

    model = build_empty_model(config)
    layers = decoder_layers(model)
    first = layers[0]
    linears = tuple(
        LinearShape(short, lin.out_features, lin.in_features, lin.bias is not None)
        for short, lin in layer_linears(first).items()
    )
    linear_params = sum(lin.numel for lin in linears)
    layer_norm_params = sum(p.numel() for p in first.parameters()) - linear_params
    for layer in layers:
        if sum(p.numel() for p in layer.parameters()) != linear_params + layer_norm_params:
            raise ValueError(f"{name}: decoder layers differ in size; the planner assumes identical layers")
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    norm = model.model.norm
    seen: set[int] = set()
    params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    assert isinstance(head, nn.Linear)
    from lowmem_tune.planner.verify import layer_activation_profile

    return Architecture(
        name=name,
        model_type=config.model_type,
        num_layers=len(layers),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        vocab_size=config.vocab_size,
        tied_embeddings=tied,
        params=params,
        embedding_params=embeddings.weight.numel(),
        lm_head_params=0 if tied else head.weight.numel(),
        final_norm_params=sum(p.numel() for p in norm.parameters()),
        layer_norm_params=layer_norm_params,
        linears=linears,
        activations=layer_activation_profile(config),
    )


def resolve_architecture(model: str) -> Architecture:
    """The architecture of `--model`: the shipped summary of a catalog entry when it is current
    (no torch import), else a meta-device build."""
    spec = CATALOG.get(model)
    if spec is not None:
        shipped = catalog_shapes().get(model)
        if shipped is not None and shipped["fingerprint"] == spec_fingerprint(spec):
            return Architecture.from_dict(shipped["architecture"])
    from lowmem_tune.catalog import resolve_model

    resolved = resolve_model(model)
    return summarize(resolved.name, resolved.config)


def catalog_shapes() -> dict[str, Any]:
    """The shipped summaries: {name: {"fingerprint", "architecture"}}."""
    return json.loads(CATALOG_SHAPES.read_text())


def write_catalog_shapes(path: Path = CATALOG_SHAPES) -> None:
    """Regenerate the shipped summaries from meta builds of every catalog model."""
    entries = {
        name: {"fingerprint": spec_fingerprint(spec), "architecture": summarize(name, spec.build_config()).to_dict()}
        for name, spec in CATALOG.items()
    }
    write_text_atomic(path, json.dumps(entries, indent=1) + "\n")


if __name__ == "__main__":
    write_catalog_shapes()
