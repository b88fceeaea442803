"""`lowmem-tune plan`: every strategy's memory for a model on a card, the best that fits, its profile
(`--verify`: one step measured on fake tensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowmem_tune.atomic import write_text_atomic
from lowmem_tune.errors import UserError
from lowmem_tune.hardware import format_bytes, reserve_bytes, resolve_gpu, usable_bytes
from lowmem_tune.planner.architecture import Architecture, resolve_architecture
from lowmem_tune.planner.components import LOSS_TARGETS
from lowmem_tune.planner.estimate import COMPONENTS
from lowmem_tune.planner.search import Candidate, build_profile, nearest_fixes, search
from lowmem_tune.profile import ADAPTERS


def plan_command(model: str, gpu: str, gpu_index: int, margin: float, strategy: str | None, seq_len: int,
                 micro_batch_size: int | None, prefer: str, verify: bool, as_json: bool,
                 output: Path | None, gpus: int = 1) -> None:
    if seq_len <= 0:
        raise UserError(f"--seq-len {seq_len}: must be at least 1")
    if micro_batch_size is not None and micro_batch_size <= 0:
        raise UserError(f"--micro-batch-size {micro_batch_size}: must be at least 1")
    if gpus <= 0:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    target = resolve_gpu(gpu, gpu_index)
    usable = usable_bytes(target.total_bytes, margin, target.used_by_others_bytes)
    arch = resolve_architecture(model)
    found = search(arch, target, usable, seq_len, micro_batch_size, prefer, strategy, gpus)
    candidates, chosen = found.candidates, found.chosen
    fixes = {} if chosen is not None else {
        c.strategy: nearest_fixes(arch, target, margin, seq_len, micro_batch_size, prefer, c.strategy, gpus)
        for c in candidates if c.strategy not in ADAPTERS or strategy}
    report = {
        "model": {"name": arch.name, "params": arch.params, "layers": arch.num_layers,
                  "hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size},
        "gpu": {"name": target.name, "total_bytes": target.total_bytes, "usable_bytes": usable,
                "reserve_bytes": reserve_bytes(target.total_bytes), "margin": margin, "source": target.source},
        "workload": _workload(chosen or candidates[0]),
        "candidates": [_candidate_json(c) for c in candidates],
        "chosen": None if chosen is None else _candidate_json(chosen),
        "adapter_instead": None if found.adapter_instead is None else _candidate_json(found.adapter_instead),
        "nearest_fixes": fixes,
    }
    profile = None
    if chosen is not None:
        profile = build_profile(model, chosen, gpu, margin, seq_len)
    if verify:
        if chosen is None:
            raise UserError("nothing fits, so there is no plan to verify (`plan` without --verify says what would"
                            + (f"; --strategy {found.adapter_instead.strategy} --verify checks the adapter method that fits"
                               if found.adapter_instead else "") + ")")
        from lowmem_tune.planner.verify import verify_profile

        result = verify_profile(profile)
        report["verify"] = {**result.to_dict(), "analytic_bytes": chosen.estimate.total,
                            "relative_error": round(chosen.estimate.total / result.peak_bytes - 1, 4)}
    if output is not None:
        if profile is None:
            raise UserError(f"-o {output}: nothing fits, so no profile was written")
        write_text_atomic(output, profile.to_yaml())
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_tables(report, arch, candidates, chosen, found.adapter_instead, output, gpus)


def _workload(c: Candidate) -> dict[str, Any]:
    w = c.workload
    return {"seq_len": w.seq_len, "micro_batch_size": w.micro_batch_size,
            "gradient_accumulation": w.gradient_accumulation,
            "gradient_checkpointing": w.gradient_checkpointing, "dtype": w.dtype, "gpus": w.gpus,
            "global_batch": w.global_batch, "loss_targets": LOSS_TARGETS}


def _settings_text(c: Candidate) -> str:
    """The candidate's settings as `key=value` pairs; unset ones (the strategy's default) left out."""
    return ", ".join(f"{k}={v}" for k, v in c.settings().items() if v is not None)


def _candidate_json(c: Candidate) -> dict[str, Any]:
    return {"strategy": c.strategy, "full_parameter": c.strategy not in ADAPTERS, "settings": c.settings(),
            "fits": c.fits, "why": c.why,
            "peak_at": c.estimate.phase, "notes": c.estimate.notes, "memory": c.estimate.memory}


_SHORT = {"weights": "wts", "gradients": "grad", "optimizer": "opt", "projectors": "proj",
          "activations": "act", "logits": "logit", "overhead": "other"}
"""Column heads that keep the table within 80 columns; --json has the full names."""


def _print_tables(report: dict[str, Any], arch: Architecture, candidates: list[Candidate],
                  chosen: Candidate | None, adapter_instead: Candidate | None, output: Path | None, gpus: int) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    g = report["gpu"]
    console.print(
        f"[bold]{arch.name}[/]: {arch.params:,} parameters, {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"vocab {arch.vocab_size}\n[bold]GPU[/] {g['name']} ({g['source']}): {format_bytes(g['total_bytes'])} total, "
        f"{format_bytes(g['usable_bytes'])} usable after {format_bytes(g['reserve_bytes'])} CUDA reserve "
        f"(context, cuBLAS workspace, allocator slack) and a {g['margin']:.0%} margin"
        + (f"; {gpus} of them, data parallel (memory per GPU)" if gpus > 1 else "")
    )
    w = report["workload"]
    adapters = any(c.strategy in ADAPTERS for c in candidates)
    table = Table(title=f"Peak memory per strategy (GiB), seq len {w['seq_len']}, weights in {w['dtype']}",
                  caption=f"logit: the loss's logits, {LOSS_TARGETS}"
                  + ("; below the line: adapter methods (a frozen base, not full-parameter)" if adapters else ""),
                  box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("strategy", no_wrap=True)
    for name in COMPONENTS:
        table.add_column(_SHORT.get(name, name), justify="right")
    table.add_column("total", justify="right")
    table.add_column("fits")
    for i, c in enumerate(candidates):
        mark = "[green]yes[/]" if c.fits else "[red]no[/]"
        style = "bold" if c is chosen else "dim" if c.strategy in ADAPTERS and c is not adapter_instead else None
        table.add_row(c.strategy, *(f"{c.estimate.memory[k] / 1024**3:.2f}" for k in COMPONENTS),
                      f"{c.estimate.total / 1024**3:.2f}", mark, style=style,
                      end_section=i + 1 < len(candidates) and c.strategy not in ADAPTERS
                      and candidates[i + 1].strategy in ADAPTERS)
    console.print(table)
    for c in candidates:
        notes = f" ({'; '.join(c.estimate.notes)})" if c.estimate.notes else ""
        console.print(f"  [bold]{c.strategy}[/] {escape('[' + _settings_text(c) + ']')}: {c.why}{notes}", highlight=False)
    if chosen is None and adapter_instead is not None:
        a = adapter_instead
        console.print(f"[red]No full-parameter method fits.[/] An adapter method does: [bold]{a.strategy}[/], "
                      f"peak {format_bytes(a.estimate.total)} (it trains low-rank adapters on a frozen base); "
                      f"pick it with `--strategy {a.strategy}`. What would make a full-parameter method fit:")
    if chosen is None:
        if adapter_instead is None:
            console.print("[red]Nothing fits.[/] What would, per strategy:")
        for name, fixes in report["nearest_fixes"].items():
            console.print(f"  {name}: {' or '.join(fixes) if fixes else 'none of the cards in the presets'}",
                          highlight=False)
        return
    console.print(f"[bold green]Chosen:[/] {chosen.strategy} — " + _settings_text(chosen)
                  + f"; {chosen.workload.global_batch} sequences per step over {gpus} GPUs" * (gpus > 1))
    if "verify" in report:
        v = report["verify"]
        console.print(
            f"[bold]Verified[/] on fake tensors in {v['seconds']:.1f} s: measured peak {format_bytes(v['peak_bytes'])} "
            f"({v['peak_at']}), analytic {format_bytes(v['analytic_bytes'])} ({v['relative_error']:+.1%}); by category: "
            + ", ".join(f"{k} {format_bytes(b)}" for k, b in v["by_category"].items())
        )
    if output is not None:
        launch = f" --nproc-per-node {gpus}" if gpus > 1 else ""
        console.print(f"Profile written to {output} (run it with `lowmem-tune run {output}{launch}`)")
