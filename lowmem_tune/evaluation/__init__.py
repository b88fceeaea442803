"""Evaluation: task cards (evaluate/), log-likelihood and generation scorers, `lowmem-tune eval`.

Public API:
- `evaluate_tasks(model, tokenizer, tasks, ...) -> RESULTS` for a model already loaded;
- `eval_command(...)` behind `lowmem-tune eval`.
"""

from lowmem_tune.evaluation.command import eval_command
from lowmem_tune.evaluation.runner import evaluate_tasks

__all__ = ["eval_command", "evaluate_tasks"]
