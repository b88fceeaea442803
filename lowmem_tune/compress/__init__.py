"""WeLore compression."""

from lowmem_tune.errors import UserError


def compress_command(**kwargs) -> None:
    raise UserError("`compress` is not available yet in this build")
