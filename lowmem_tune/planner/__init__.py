"""Memory planner."""

from lowmem_tune.errors import UserError


def plan_command(**kwargs) -> None:
    raise UserError("`plan` is not available yet in this build")
