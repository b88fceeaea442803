"""`lowmem-tune eval`: load a model and its tokenizer, evaluate, print a table, write JSON (one
document: per-task results, per-suite groups, the protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_tune.atomic import write_json_atomic
from lowmem_tune.commands import working
from lowmem_tune.errors import UserError


def parse_data_files(specs: tuple[str, ...] | list[str], tasks: list[str], dataset: str | None = None
                     ) -> dict[str, str]:
    """`TASK=PATH` (or `SUITE=DIR`) entries, or one bare PATH: the single task's, or the suite's
    directory when `dataset` is a suite (DIR holds an entry per task)."""
    from lowmem_tune.evaluation.cards import suite_groups

    out: dict[str, str] = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep:
            if len(tasks) == 1:
                task, path = tasks[0], spec
            elif dataset is not None and dataset in suite_groups([dataset]) and Path(spec).expanduser().is_dir():
                task, path = dataset, spec
            else:
                shown = ", ".join(tasks[:8]) + (", ..." if len(tasks) > 8 else "")
                raise UserError(f"--data-file {spec}: several tasks are evaluated ({shown}); write TASK=PATH, or "
                                "give a directory with an entry per task")
        if task in out:
            raise UserError(f"--data-file: task {task} is given twice")
        out[task] = path
    return out


def _cell(summary: dict[str, Any], metric: str, stderr: str | None = None) -> str:
    if summary.get(metric) is None:
        return "—"
    err = summary.get(stderr or f"{metric}_stderr")
    return f"{100 * summary[metric]:.2f}" + (f" ± {100 * err:.2f}" if err is not None else "")


def results_table(results: dict[str, Any]):
    """A rich table: one row per task, acc ± stderr, acc_norm where reported, n, shots (the scorer
    in a column where tasks differ in it); then per suite its mean weighted by the tasks' n
    (lm-eval's group score) and its plain mean over tasks."""
    from rich.table import Table

    tasks = results["tasks"]
    groups = results.get("groups") or {}
    protocols = results["protocol"]["tasks"]
    norm = any("acc_norm" in s for s in tasks.values())
    scorers = sorted({protocols[t]["scorer"] for t in tasks})
    table = Table(title="Evaluation (accuracy, %)",
                  caption=f"scored by {scorers[0]}" if len(scorers) == 1 else None)
    columns = ["task", "acc", *(["acc_norm"] if norm else []), "n", "shots", *(["scorer"] if len(scorers) > 1 else [])]
    for name in columns:
        table.add_column(name, justify="left" if name in ("task", "scorer") else "right", no_wrap=True)

    def row(label: str, scores: dict[str, Any], acc: str, shots: str, scorer: str) -> None:
        cells = [_cell(scores, acc, f"{acc}_stderr")]
        if norm:
            norm_key = acc.replace("acc", "acc_norm", 1)
            cells.append(_cell(scores, norm_key, f"{norm_key}_stderr"))
        table.add_row(label, *cells, str(scores["n"]), shots, *([scorer] if len(scorers) > 1 else []))

    for task, summary in tasks.items():
        row(task, summary, "acc", str(protocols[task]["num_fewshot"]), protocols[task]["scorer"])
    if groups:
        table.add_section()
    for group, scores in groups.items():
        row(f"{group} (weighted, lm-eval)", scores, "acc_weighted", "", "")
        row(f"{group} (mean of {len(scores['tasks'])})", scores, "acc_macro", "", "")
    if len(tasks) > 1 and not groups:
        mean_acc = sum(s["acc"] for s in tasks.values()) / len(tasks)
        table.add_section()
        table.add_row("mean", f"{100 * mean_acc:.2f}", *([""] * (len(columns) - 2)))
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
                 device: str = "auto", dtype: str = "auto", add_bos: bool | None = None,
                 apply_chat_template: bool = False, fewshot_as_multiturn: bool | None = None) -> None:
    """`output`: the JSON document's path (`-`: standard output, the table then goes to standard error)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.evaluation.cards import expand_tasks
    from lowmem_tune.evaluation.runner import chat_renderer, check_tasks, evaluate_tasks
    from lowmem_tune.modeling import load_model, pick_device, quiet_library_progress, resolve_dtype

    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a positive number of rows")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give a positive batch size")
    quiet_library_progress()  # their bars would tear through ours
    tasks = expand_tasks([dataset])
    files = parse_data_files(data_files, tasks, dataset)
    check_tasks(tasks, files)  # unknown names and missing files fail before the model loads
    if model is None:
        model = str(latest_final_model())
        Console(stderr=True).print(f"evaluating {model} (the latest run's final model under ./{RUNS_DIR}; "
                                   "--model chooses another)", highlight=False)
    resolved = resolve_model(model)
    torch_device = pick_device(device)
    tokenizer = _load_tokenizer(resolved)
    chat_renderer(tokenizer, apply_chat_template, fewshot_as_multiturn)  # no chat template: fails before the model loads
    with working(f"loading {resolved.name}"):
        loaded = load_model(resolved, "pretrained", resolve_dtype(dtype, torch_device), torch_device)

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        bars: dict[str, Any] = {}

        def progress(task: str, done: int, total: int) -> None:
            if task not in bars:
                bars[task] = bar.add_task(task, total=total)
            bar.update(bars[task], completed=done, total=total)

        results = evaluate_tasks(loaded, tokenizer, [dataset], limit=limit, num_fewshot=num_fewshot,
                                 batch_size=batch_size, data_files=files, add_bos=add_bos,
                                 apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
                                 progress=progress)
    results["protocol"]["model"] = str(resolved.pretrained_path)
    to_stdout = output is not None and str(output) == "-"
    out = Console(stderr=to_stdout)
    out.print(results_table(results))
    if to_stdout:
        import json
        import sys

        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    elif output is not None:
        write_json_atomic(output, results)
        out.print(f"results written to {output}")
