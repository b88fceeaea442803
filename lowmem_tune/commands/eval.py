"""`lowmem-tune eval`: load a model and its tokenizer, evaluate, print a table, write JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_tune.atomic import write_json_atomic
from lowmem_tune.errors import UserError


def parse_data_files(specs: tuple[str, ...] | list[str], tasks: list[str]) -> dict[str, str]:
    """`TASK=PATH` entries, or one bare PATH when a single task is evaluated."""
    out: dict[str, str] = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep:
            if len(tasks) != 1:
                raise UserError(f"--data-file {spec}: several tasks are evaluated ({', '.join(tasks)}); write TASK=PATH")
            task, path = tasks[0], spec
        if task in out:
            raise UserError(f"--data-file: task {task} is given twice")
        out[task] = path
    return out


def results_table(results: dict[str, Any]):
    """A rich table: one row per task, acc ± stderr, acc_norm where reported, n, scorer."""
    from rich.table import Table

    def cell(summary: dict[str, Any], metric: str) -> str:
        if metric not in summary:
            return "—"
        err = summary.get(f"{metric}_stderr")
        return f"{100 * summary[metric]:.2f}" + (f" ± {100 * err:.2f}" if err is not None else "")

    table = Table(title="Evaluation (accuracy, %)")
    for name in ("task", "acc", "acc_norm", "n", "scorer", "shots"):
        table.add_column(name, justify="left" if name in ("task", "scorer") else "right")
    tasks = results["tasks"]
    for task, summary in tasks.items():
        proto = results["protocol"]["tasks"][task]
        table.add_row(task, cell(summary, "acc"), cell(summary, "acc_norm"), str(summary["n"]),
                      proto["scorer"], str(proto["num_fewshot"]))
    if len(tasks) > 1:
        mean_acc = sum(s["acc"] for s in tasks.values()) / len(tasks)
        table.add_section()
        table.add_row("mean", f"{100 * mean_acc:.2f}", "", "", "", "")
    return table


def _load_tokenizer(resolved):
    from lowmem_tune.modeling import load_tokenizer

    if resolved.pretrained_path is None:
        raise UserError(f"model {resolved.name!r} is an architecture only: evaluate a trained model directory")
    return load_tokenizer(resolved.pretrained_path)


RUNS_DIR = Path("runs")


def latest_final_model(runs: Path = RUNS_DIR) -> Path:
    """The most recently written RUN/final/ under `runs` (what `eval` evaluates without --model)."""
    finals = [p for p in runs.glob("*/final") if (p / "config.json").is_file()] if runs.is_dir() else []
    if not finals:
        raise UserError(f"eval: no --model given and no run under ./{runs} has a final/ model "
                        "(train one with `lowmem-tune run`, or pass --model DIR)")
    return max(finals, key=lambda p: (p / "config.json").stat().st_mtime_ns)


def eval_command(dataset: str, model: str | None, data_files: tuple[str, ...] = (), limit: int | None = None,
                 num_fewshot: int | None = None, batch_size: int = 8, output: Path | None = None,
                 device: str = "auto", dtype: str = "auto", add_bos: bool | None = None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.evaluation.cards import expand_tasks
    from lowmem_tune.evaluation.runner import check_tasks, evaluate_tasks
    from lowmem_tune.modeling import load_model, pick_device, quiet_library_progress, resolve_dtype

    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a positive number of rows")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give a positive batch size")
    quiet_library_progress()  # their bars would tear through ours
    tasks = expand_tasks([dataset])
    files = parse_data_files(data_files, tasks)
    check_tasks(tasks, files)  # unknown names and missing files fail before the model loads
    if model is None:
        model = str(latest_final_model())
        Console(stderr=True).print(f"evaluating {model} (the latest run's final model under ./{RUNS_DIR}; "
                                   "--model chooses another)", highlight=False)
    resolved = resolve_model(model)
    torch_device = pick_device(device)
    tokenizer = _load_tokenizer(resolved)
    loaded = load_model(resolved, "pretrained", resolve_dtype(dtype, torch_device), torch_device)

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        bars: dict[str, Any] = {}

        def progress(task: str, done: int, total: int) -> None:
            if task not in bars:
                bars[task] = bar.add_task(task, total=total)
            bar.update(bars[task], completed=done, total=total)

        results = evaluate_tasks(loaded, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot,
                                 batch_size=batch_size, data_files=files, add_bos=add_bos, progress=progress)
    results["protocol"]["model"] = str(resolved.pretrained_path)
    Console().print(results_table(results))
    if output is not None:
        write_json_atomic(output, results)
        Console().print(f"results written to {output}")
