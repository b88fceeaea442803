"""Command line: parses arguments and delegates. Heavy modules are imported inside each command
so that `lowmem-tune --help` and `plan` start fast."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lowmem_tune import __version__
from lowmem_tune.errors import UserError
from lowmem_tune.profile import STRATEGY_NAMES


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2, with no traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowmem-tune")
def main() -> None:
    """Finetune 7B-class LLMs on one consumer GPU with full-parameter-quality methods."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def probe(as_json: bool) -> None:
    """Show the NVIDIA GPUs here: memory, compute capability, bf16, utilization."""
    from lowmem_tune.commands.probe import probe_command

    probe_command(as_json=as_json)


@main.command()
@click.option("--model", "model", required=True, help="Catalog name, hub id, local model directory or config.json.")
@click.option("--gpu", default="auto", show_default=True, help="auto, a preset (rtx4090, ...) or a size (24GB, 24GiB).")
@click.option("--gpu-index", default=0, show_default=True, help="Which GPU --gpu auto reads.")
@click.option("--margin", default=0.10, show_default=True, help="Share of usable memory kept free.")
@click.option("--strategy", type=click.Choice(STRATEGY_NAMES), default=None, help="Pin the strategy.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per sequence.")
@click.option("--micro-batch-size", default=None, type=int, help="Pin the micro batch size.")
@click.option("--prefer", type=click.Choice(["quality", "speed", "memory"]), default="quality", show_default=True)
@click.option("--gpus", default=1, show_default=True,
              help="Data-parallel GPUs of this kind (`run --nproc-per-node`); memory is per GPU.")
@click.option("--verify", is_flag=True, help="Measure one real step on fake tensors (no weights, no GPU).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the chosen plan as a profile YAML.")
def plan(model: str, gpu: str, gpu_index: int, margin: float, strategy: str | None, seq_len: int,
         micro_batch_size: int | None, prefer: str, gpus: int, verify: bool, as_json: bool,
         output: Path | None) -> None:
    """Estimate memory for every strategy and pick the best one that fits."""
    from lowmem_tune.commands.plan import plan_command

    plan_command(model=model, gpu=gpu, gpu_index=gpu_index, margin=margin, strategy=strategy, seq_len=seq_len,
                 micro_batch_size=micro_batch_size, prefer=prefer, gpus=gpus, verify=verify, as_json=as_json,
                 output=output)


@main.command()
@click.argument("profile", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a profile key (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in the output directory.")
@click.option("--headless", is_flag=True, help="No dashboard: a progress bar, or plain lines when not a terminal.")
@click.option("--nproc-per-node", type=int, default=None,
              help="Train on N processes of this machine (one GPU each, or CPU processes) through torchrun.")
def run(profile: Path, overrides: tuple[str, ...], resume: bool, headless: bool, nproc_per_node: int | None) -> None:
    """Train with a profile, checkpointing, and evaluate at the end."""
    from lowmem_tune.commands.run import run_command

    run_command(profile, overrides, resume, headless, nproc_per_node)


@main.command()
@click.argument("profile", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a profile key (repeatable).")
@click.option("--examples", "examples", type=int, default=2, show_default=True,
              help="Rendered examples to show, trained tokens marked.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
def data(profile: Path, overrides: tuple[str, ...], examples: int, as_json: bool) -> None:
    """Look at a profile's data as a run would tokenize it: lengths, truncation, loss share, examples."""
    from lowmem_tune.commands.data import data_command

    data_command(profile, overrides, examples, as_json)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def monitor(run_dir: Path) -> None:
    """Attach the live dashboard to a run directory (running or finished)."""
    from lowmem_tune.tui import monitor_command

    monitor_command(run_dir)


@main.command(name="eval")
@click.option("--dataset", "dataset", required=True,
              help="A task (boolq, piqa, mmlu_anatomy, ...) or a suite (commonsense, welore, mmlu).")
@click.option("--model", "model", default=None,
              help="Model directory, catalog name or hub id (default: the latest run's final/ under ./runs).")
@click.option("--data-file", "data_files", multiple=True, metavar="[TASK=]PATH",
              help="Local JSON / JSONL / parquet or save_to_disk directory in the task's schema (TASK=PATH "
                   "for suites; SUITE=DIR: a directory with an entry per task or subject).")
@click.option("--limit", type=int, default=None, help="Evaluate the first N examples of each task.")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples (default: the task card's).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--json", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PATH", help="Write the results as one JSON document (- for standard output).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto", show_default=True,
              help="auto: bf16 on GPUs and CPUs with bf16 units, else fp32.")
@click.option("--add-bos/--no-add-bos", "add_bos", default=None,
              help="BOS before every request (default: as the tokenizer does on its own, like lm-eval and training).")
@click.option("--apply-chat-template", is_flag=True,
              help="Render each context with the tokenizer's chat template, as lm-eval's --apply_chat_template.")
@click.option("--fewshot-as-multiturn/--no-fewshot-as-multiturn", "fewshot_as_multiturn", default=None,
              help="With --apply-chat-template: few-shot examples as user/assistant turns (the default) or "
                   "joined with the question into one user turn.")
def eval_(dataset: str, model: str | None, data_files: tuple[str, ...], limit: int | None, num_fewshot: int | None,
          batch_size: int, output: Path | None, device: str, dtype: str, add_bos: bool | None,
          apply_chat_template: bool, fewshot_as_multiturn: bool | None) -> None:
    """Evaluate a model on tasks scored the way the field scores them."""
    from lowmem_tune.commands.eval import eval_command

    eval_command(dataset=dataset, model=model, data_files=data_files, limit=limit, num_fewshot=num_fewshot,
                 batch_size=batch_size, output=output, device=device, dtype=dtype, add_bos=add_bos,
                 apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn)


@main.command()
@click.option("--model", "model", required=True, help="Catalog name, hub id or local model directory.")
@click.option("--rank-reduction", default=0.5, show_default=True, help="Share of total rank to remove (ERR).")
@click.option("--min-ratio", default=0.5, show_default=True, help="Dropped share above which a matrix is low-rank.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--merge", is_flag=True, help="Multiply the factors back into a dense transformers model.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def compress(model: str, rank_reduction: float, min_ratio: float, output: Path, merge: bool, device: str) -> None:
    """WeLore: rank-reduce a model non-uniformly (low-rank components) and save it."""
    from lowmem_tune.commands.compress import compress_command

    compress_command(model=model, rank_reduction=rank_reduction, min_ratio=min_ratio, output=output,
                     merge=merge, device=device)


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True)
def merge(model: str, output: Path) -> None:
    """Turn a WeLore-compressed model (from `compress` or a welore run's final/) into a dense one."""
    from lowmem_tune.commands.compress import merge_command

    merge_command(model=model, output=output)


@main.group(cls=_Group)
def inspect() -> None:
    """Look inside a model: outlier ratios per layer."""


@inspect.command()
@click.option("--model", "model", required=True, help="Catalog name, hub id or local model directory.")
@click.option("--calibration-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Plain text for calibration (default: generated synthetic-boolq text).")
@click.option("--samples", default=32, show_default=True, help="Calibration sequences.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per calibration sequence.")
@click.option("--threshold", default=13.0, show_default=True, help="M: a weight is an outlier above M x the layer mean.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def outliers(model: str, calibration_file: Path | None, samples: int, seq_len: int, threshold: float,
             device: str) -> None:
    """Per-layer outlier ratios (OwLore) and the sampling probabilities they give."""
    from lowmem_tune.commands.inspect import inspect_outliers_command

    inspect_outliers_command(model=model, calibration_file=calibration_file, samples=samples, seq_len=seq_len,
                             threshold=threshold, device=device)


if __name__ == "__main__":
    main()
