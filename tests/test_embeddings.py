"""Embeddings and the LM head through GaLore (strategy.embedding_rank), tied or not."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_tune.profile import load_profile, profile_from_dict
from lowmem_tune.strategies import StrategyContext, build_strategy
from lowmem_tune.train import RunControl, run_training


class _Quiet:
    def emit(self, event) -> None:
        pass


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_and_head_become_galore_matrices_once(tied):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                         tie_word_embeddings=tied))
    profile = profile_from_dict({"strategy": {"name": "galore", "rank": 8, "embedding_rank": 4},
                                 "train": {"lr": 1e-2}})
    strategy = build_strategy(profile)
    ctx = StrategyContext(device=torch.device("cpu"), dtype=torch.float32)
    model = strategy.prepare_model(model, ctx)
    updater = strategy.build_updater(model, ctx)
    groups = updater.optimizer.param_groups
    embedding_group = next(g for g in groups if g.get("rank") == 4)
    heads = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert {id(p) for p in embedding_group["params"]} == heads and len(embedding_group["params"]) == (1 if tied else 2)
    assert all(id(p) not in heads for g in groups if g is not embedding_group for p in g["params"])
    before = model.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, 300, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    updater.step()
    state = updater.optimizer.state[model.get_input_embeddings().weight]
    assert tuple(state["projector"].low_rank_shape()) == (300, 4)  # V x h: the right projector, rank 4
    assert not torch.equal(model.get_input_embeddings().weight, before)
    updater.close()


def test_the_demo_trains_with_galore_on_the_embeddings_and_head(tmp_path):
    profile = load_profile("demo", ["strategy.embedding_rank=16", f"output.dir={tmp_path / 'run'}",
                                    "eval.baseline=false"])
    assert run_training(profile, False, _Quiet(), RunControl()).status == "completed"
    final = json.loads((tmp_path / "run" / "eval.json").read_text())["final"]["tasks"]["synthetic-boolq"]
    assert final["acc"] >= 0.95
