"""The analytic totals agree with the peak measured on fake tensors (small config)."""

from __future__ import annotations

import pytest

from lowmem_tune.planner.estimate import estimate_profile
from lowmem_tune.planner.verify import verify_profile
from lowmem_tune.profile import profile_from_dict


@pytest.mark.parametrize("strategy, checkpointing, knobs", [
    ("full", True, {}), ("adamw8bit", False, {}), ("galore", True, {}),
    # APOLLO keeps every matrix's gradient while micro-batches accumulate; layerwise, the update's
    # temporaries run in backward; INT8 weights; inside LISA
    ("apollo", True, {}), ("apollo", False, {"layerwise": False}),
    ("apollo-mini", True, {"weight_bits": 8, "group_size": 32}),
    ("lisa", True, {"sampled_layers": 1, "optimizer": "apollo"}),
    # frozen layers between sampled ones keep a smaller activation set without checkpointing
    ("owlore", False, {"sampled_layers": 2}),
    ("lisa", True, {"sampled_layers": 1, "optimizer": "adamw"}),
    ("welore", False, {}),  # a compressed model at the assumed ranks, measured after compression
    # INT8 factors and dense matrices; 32 does not divide the factors' ranks (shorter last groups)
    ("welore", True, {"weight_bits": 8, "group_size": 32}),
    # adapters: what peft keeps (a float32 input per target, the dropout's output), NF4 codes
    ("lora", False, {}), ("qlora", True, {"lora_rank": 8}),
    # DoRA with dropout recomputes the base output in float32 through a float32 copy of the weight
    ("dora", False, {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
])
def test_analytic_total_within_5_percent_of_fake_peak(strategy, checkpointing, knobs):
    seq_len, batch = 128, 2
    profile = profile_from_dict({
        "model": {"name": "demo-llama", "init": "random", "dtype": "bfloat16"},
        "strategy": {"name": strategy, **knobs},
        "train": {"micro_batch_size": batch, "gradient_accumulation": 2, "activation_checkpointing": checkpointing},
        "data": {"max_seq_len": seq_len},
    })
    measured = verify_profile(profile)
    analytic = estimate_profile(profile, dtype_bytes=2)
    assert measured.peak_bytes > 0 and measured.by_category["weights"] > 0
    assert abs(analytic.total / measured.peak_bytes - 1) < 0.05, (analytic.memory, measured.by_category)



@pytest.mark.parametrize("strategy, knobs", [("apollo", {}), ("apollo-mini", {"weight_bits": 8, "group_size": 32})])
def test_apollo_with_one_micro_batch_a_step_within_5_percent(strategy, knobs):
    """What the planner picks for APOLLO on small cards: steps of one micro-batch, each matrix
    updated in its hook, its gradient and the update's temporaries inside the layer's backward."""
    profile = profile_from_dict({
        "model": {"name": "demo-llama", "init": "random", "dtype": "bfloat16"},
        "strategy": {"name": strategy, **knobs},
        "train": {"micro_batch_size": 2, "gradient_accumulation": 1, "activation_checkpointing": True},
        "data": {"max_seq_len": 128},
    })
    measured = verify_profile(profile)
    analytic = estimate_profile(profile, dtype_bytes=2)
    assert abs(analytic.total / measured.peak_bytes - 1) < 0.05, (analytic.memory, measured.by_category)
