"""Memory planner: what fits a GPU, with which strategy and knobs (`lowmem-tune plan` is
`lowmem_tune.commands.plan`).

The analytic path (architecture summary, estimate, search) does not import torch, so a plan for a
catalog model answers in well under two seconds; `verify` imports torch and runs the chosen
strategy on fake tensors.
"""
