"""Outlier ratios."""

from lowmem_tune.errors import UserError


def inspect_outliers_command(**kwargs) -> None:
    raise UserError("`inspect outliers` is not available yet in this build")
