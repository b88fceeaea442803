"""`lowmem-tune probe`: the GPUs here, from NVML (no CUDA context, no torch)."""

from __future__ import annotations

import json
from dataclasses import asdict

from lowmem_tune.hardware import format_bytes, probe_gpus


def _na(value, fmt="{}") -> str:
    return "n/a" if value is None else fmt.format(value)


def probe_command(as_json: bool) -> None:
    gpus = probe_gpus()
    if as_json:
        print(json.dumps({"gpus": [asdict(g) for g in gpus]}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not gpus:
        console.print("no NVIDIA GPU found (no driver or NVML library); plan with --gpu rtx4090 or --gpu 24GiB")
        return
    table = Table(title=f"NVIDIA GPUs (driver {gpus[0].driver_version})")
    for column in ("#", "name", "uuid", "total", "free", "used", "reserved", "cc", "bf16", "util", "temp", "power"):
        table.add_column(column)
    for g in gpus:
        table.add_row(
            str(g.index), g.name, g.uuid, format_bytes(g.total_bytes), format_bytes(g.free_bytes),
            format_bytes(g.used_bytes), _na(None if g.reserved_bytes is None else format_bytes(g.reserved_bytes)),
            f"{g.compute_capability[0]}.{g.compute_capability[1]}", "yes" if g.bf16 else "no",
            _na(g.utilization_percent, "{}%"), _na(g.temperature_c, "{} °C"), _na(g.power_w, "{:.0f} W"),
        )
    console.print(table)
