"""Evaluation."""

from lowmem_tune.errors import UserError


def eval_command(**kwargs) -> None:
    raise UserError("`eval` is not available yet in this build")
