"""How many steps the first bases wait under gradient accumulation, by the optimizer's own sizes.

With several micro-batches a step, a matrix's first-basis sketch lives from its first micro-batch
to the step, and `SketchRoom` admits sketches only while they fit in what the matrices still
without a basis will hold once trained; the others drop that step's gradient and try again at the
next (see lowmem_tune/optim/subspace.py). This runs the real `GaLoreAdamW` on fake tensors
(FakeTensorMode: shapes, no storage) over a model's decoder matrices, in bf16 with 8-bit moments,
two micro-batches a step, gradients arriving in backward order (last layer first), and reports
per configuration: the step (1-based) at which the last matrix takes its first basis, and the mean
number of steps a matrix trains without its gradient (the steps it waited).

    python benchmarks/first_basis_wait.py [--model llama-2-7b]

Results: benchmarks/results/first_basis_wait.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not

CONFIGURATIONS = (
    ("every layer, rank 256", None, 256),
    ("every layer, rank 128", None, 128),
    ("OwLore sample of 4 layers, rank 128", 4, 128),
    ("OwLore sample of 2 layers, rank 128", 2, 128),
)


def first_basis_steps(model: str, layers: int | None, rank: int, max_steps: int = 100) -> list[int]:
    """The 1-based step at which each decoder matrix takes its first basis."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem_tune.optim import GaLoreAdamW, GaLoreConfig
    from lowmem_tune.planner.architecture import resolve_architecture

    arch = resolve_architecture(model)
    count = arch.num_layers if layers is None else layers
    with FakeTensorMode():
        mats = [torch.nn.Parameter(torch.empty(lin.out_features, lin.in_features, dtype=torch.bfloat16))
                for _ in range(count) for lin in arch.linears]
        opt = GaLoreAdamW([{"params": mats, "rank": rank, "update_proj_gap": 200}],
                          config=GaLoreConfig(bits=8, svd="sketch", stagger=True, micro_batches=2))
        taken: dict[int, int] = {}
        for step in range(1, max_steps + 1):
            for _ in range(2):
                for p in reversed(mats):
                    p.grad = torch.empty_like(p)
                    opt.absorb_grad(p)
            opt.step_clipped(1.0)
            for i, p in enumerate(mats):
                if i not in taken and not opt.state[p]["projector"].needs_basis():
                    taken[i] = step
            if len(taken) == len(mats):
                break
    return [taken.get(i, max_steps + 1) for i in range(len(mats))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--output", default="first_basis_wait", help="results file stem in benchmarks/results/")
    args = parser.parse_args()

    rows = []
    for label, layers, rank in CONFIGURATIONS:
        steps = first_basis_steps(args.model, layers, rank)
        rows.append({"configuration": label, "matrices": len(steps), "last_first_basis_step": max(steps),
                     "mean_steps_waited": sum(s - 1 for s in steps) / len(steps)})
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "model": args.model, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"First bases under gradient accumulation, {args.model}, bf16, 8-bit moments, 2 micro-batches a "
             f"step — {result['date']}, commit {commit} (`python benchmarks/first_basis_wait.py"
             f"{' --output ' + args.output if args.output != 'first_basis_wait' else ''}`; fake "
             "tensors, the optimizer's own sizes)", "",
             "| configuration | matrices | last first basis at step | mean steps waited |", "|---|---|---|---|"]
    lines += [f"| {r['configuration']} | {r['matrices']} | {r['last_first_basis_step']} | {r['mean_steps_waited']:.2f} |"
              for r in rows]
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
