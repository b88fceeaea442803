"""Evaluation: task cards (evaluate/), log-likelihood and generation scorers.

Public API: `evaluate_tasks(model, tokenizer, tasks, ...) -> RESULTS` for a model already loaded
(`lowmem-tune eval` is `lowmem_tune.commands.eval`).
"""

from lowmem_tune.evaluation.runner import evaluate_tasks

__all__ = ["evaluate_tasks"]
