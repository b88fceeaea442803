"""`lowmem-tune run`: a profile trained in this process (with the dashboard in a terminal, plain
progress otherwise), or on several through torchrun."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from lowmem_tune.profile import load_profile


def run_command(profile: Path, overrides: tuple[str, ...], resume: bool, headless: bool,
                nproc_per_node: int | None) -> None:
    notes: list[str] = []
    loaded = load_profile(profile, overrides, notes)
    if nproc_per_node is not None:
        from lowmem_tune.train.distributed import launch

        argv = [str(profile), *(a for o in overrides for a in ("--set", o)), *(["--resume"] if resume else []),
                *(["--headless"] if headless else [])]
        sys.exit(launch(nproc_per_node, argv, loaded, resume))
    rank = int(os.environ.get("RANK", 0))  # started by torchrun (or accelerate launch): one process speaks
    for note in notes if rank == 0 else []:
        click.echo(note, err=True)
    try:
        if headless or not sys.stdout.isatty() or rank > 0:
            from lowmem_tune.train import run_headless

            sys.exit(run_headless(loaded, resume=resume))
        from lowmem_tune.tui import run_with_dashboard

        sys.exit(run_with_dashboard(loaded, resume=resume))
    except KeyboardInterrupt:
        click.echo("aborted; checkpoints already written are intact (continue with --resume)", err=True)
        sys.exit(130)
