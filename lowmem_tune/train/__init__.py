"""Training."""

from lowmem_tune.errors import UserError


def run_headless(profile, resume: bool) -> int:
    raise UserError("`run` is not available yet in this build")
