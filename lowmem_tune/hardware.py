"""GPU discovery (pynvml), presets and sizes."""

from lowmem_tune.errors import UserError


def probe_command(as_json: bool) -> None:
    raise UserError("`probe` is not available yet in this build")
