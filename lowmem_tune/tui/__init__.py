"""Live dashboard."""

from lowmem_tune.errors import UserError


def run_with_dashboard(profile, resume: bool) -> int:
    from lowmem_tune.train import run_headless

    return run_headless(profile, resume=resume)


def monitor_command(run_dir) -> None:
    raise UserError("`monitor` is not available yet in this build")
