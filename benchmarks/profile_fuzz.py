"""Fuzzing run profiles at scale (issue 29, "Load"): N seeded cases from tests/helpers/profile_fuzz.py,
each a small valid tiny-llama profile with one to three keys (of every section) set to random
valid, wrong-typed, out-of-range, odd or missing values, or a corrupted file. Each runs
`lowmem-tune run PROFILE --headless` in-process up to, not including, the first training step.

A case passes when it ends with exit 0, or exit 2 and one `error: ...` line; a traceback, another
exit code, a several-line error, an invalid number accepted, or no end within --timeout fails it.
The cases run one after another in a worker process; one that does not end within twice the
limit (stuck where the in-process alarm cannot reach) is killed and counted as a hang.

    python benchmarks/profile_fuzz.py                       # 5000 cases from seed 0
    python benchmarks/profile_fuzz.py --cases 2000 --seed 100000

Prints a summary and every failing case (its profile and output); writes
benchmarks/results/profile_fuzz.md (--output to change the stem).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not
sys.path.insert(0, str(ROOT / "tests" / "helpers"))

WORK = Path(tempfile.mkdtemp(prefix="profile-fuzz-"))
# Before anything imports the hub or datasets: offline (a hub id fails at once, as in the tests),
# and every cache this writes inside WORK.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  HF_DATASETS_CACHE=str(WORK / "hf-datasets"), LOWMEM_TUNE_CACHE=str(WORK / "cache"))

import profile_fuzz  # noqa: E402


def _worker(seeds: list[int], results: Connection, timeout_s: float) -> None:
    """Runs the cases of `seeds` in order, saying which one it starts, then its outcome (a pipe:
    each message is written before the case goes on, so a crash cannot lose one). Ends after a
    case that ran out of time: the alarm may have cut through anything (an import, a library's
    state), so the next cases get a fresh process."""
    profile_fuzz.warm_up()
    for seed in seeds:
        results.send(("start", seed, None))
        outcome = profile_fuzz.check_case(profile_fuzz.make_case(seed), WORK / "cases" / f"case-{seed}", timeout_s)
        results.send(("done", seed, outcome))  # the parent deletes the case directory meanwhile
        if outcome.exit_code is None:
            return


def run_all(first: int, count: int, timeout_s: float, progress_every: int) -> list[profile_fuzz.Outcome]:
    ctx = multiprocessing.get_context("fork")  # the parent has not imported torch: forking is safe
    pending = collections.deque(range(first, first + count))
    outcomes: list[profile_fuzz.Outcome] = []
    began = time.perf_counter()
    hard_limit = 2 * timeout_s  # past the in-process alarm: stuck where it cannot reach (C code)

    def failed(seed: int, seconds: float, problem: str, exit_code: int | None = None) -> None:
        outcomes.append(profile_fuzz.Outcome(profile_fuzz.make_case(seed), exit_code, "", "", seconds, problem))
        pending.popleft()

    while pending:  # one worker process per pass; a new one after a case that ran out of time or crashed
        reader, writer = ctx.Pipe(duplex=False)
        worker = ctx.Process(target=_worker, args=(list(pending), writer, timeout_s), daemon=True)
        worker.start()
        writer.close()  # the worker holds the only writer: its end reads as EOF here
        current, since = None, time.monotonic()
        while pending:
            if not reader.poll(1.0):
                waited = time.monotonic() - since
                if current is not None and waited > hard_limit:
                    worker.kill()
                    failed(current, waited, f"no end within {hard_limit:g}s, worker killed (a hang)")
                    break
                if current is None and waited > 300:
                    raise RuntimeError("the worker started no case in 300 s")
                continue
            try:
                kind, seed, outcome = reader.recv()
            except EOFError:  # the worker is gone
                worker.join()
                if current is not None:  # inside a case: a crash in native code
                    failed(current, time.monotonic() - since, f"worker died (exit code {worker.exitcode})",
                           worker.exitcode)
                elif outcomes and outcomes[-1].exit_code is None:
                    pass  # it ended after a case that ran out of time, as it should
                else:
                    raise RuntimeError(f"the worker died before its first case (exit code {worker.exitcode})")
                break
            since = time.monotonic()
            if kind == "start":
                current = seed
                continue
            assert seed == pending[0] == current
            shutil.rmtree(WORK / "cases" / f"case-{seed}", ignore_errors=True)
            outcomes.append(outcome)
            pending.popleft()
            current = None
            if progress_every and len(outcomes) % progress_every == 0:
                failing = sum(o.problem is not None for o in outcomes)
                print(f"  {len(outcomes)}/{count} cases, {failing} failing, {time.perf_counter() - began:.0f}s",
                      flush=True)
        reader.close()
        worker.join(timeout=30)
        if worker.is_alive():
            worker.kill()
            worker.join()
    return outcomes


def _cell(text: str, limit: int) -> str:
    """`text` as one Markdown table cell."""
    return " ".join(text.split())[:limit].replace("|", "\\|")


def summarize(outcomes: list[profile_fuzz.Outcome], args: argparse.Namespace, seconds: float) -> str:
    failures = [o for o in outcomes if o.problem]
    codes = collections.Counter("hang" if o.exit_code is None else str(o.exit_code) for o in outcomes)
    problems = collections.Counter(o.problem.split(":")[0] if o.problem.startswith("traceback") else o.problem
                                   for o in failures)
    times = sorted(o.seconds for o in outcomes)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    lines = [
        f"# Profile fuzzing — {time.strftime('%Y-%m-%d')}",
        "",
        f"`python benchmarks/profile_fuzz.py --cases {args.cases} --seed {args.seed} --timeout {args.timeout:g}` — "
        f"commit {commit}{' plus uncommitted changes' if dirty else ''}, {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.",
        "",
        "Each case is a small valid tiny-llama CPU profile with one to three keys (drawn from every field of every "
        "section of `Profile`) set to random valid, wrong-typed, out-of-range (NaN, ±inf, huge), null, empty, "
        "long or odd values, or paths that do not work; or unknown keys and sections, a section that is not a "
        "mapping, an odd `--set`; or (5%) a corrupted file. It runs `lowmem-tune run p.yaml --headless` "
        "in-process up to the first training step (loading, validation and the run's whole setup).",
        "",
        "| cases | seeds | passed | failed | exit 0 | exit 2 | other | wall | per case: median / p95 / max |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {len(outcomes)} | {args.seed}..{args.seed + args.cases - 1} | {len(outcomes) - len(failures)} | "
        f"{len(failures)} | {codes.get('0', 0)} | {codes.get('2', 0)} | "
        f"{sum(v for k, v in codes.items() if k not in ('0', '2'))} | {seconds:.0f}s | "
        f"{statistics.median(times) * 1000:.0f} ms / {times[int(0.95 * (len(times) - 1))] * 1000:.0f} ms / "
        f"{times[-1]:.1f} s |",
        "",
    ]
    slowest = sorted(outcomes, key=lambda o: -o.seconds)[:5]
    lines += ["Slowest cases: " + "; ".join(f"seed {o.case.seed} {o.seconds:.1f} s ({', '.join(o.case.changes)[:100]})"
                                           for o in slowest), ""]
    if failures:
        lines += ["## Failures", "", "| seed | problem | changes |", "|---|---|---|"]
        lines += [f"| {o.case.seed} | {_cell(o.problem, 160)} | {_cell('; '.join(o.case.changes), 200)} |"
                  for o in failures]
        lines += ["", "By kind: " + ", ".join(f"{k} ({v})" for k, v in problems.most_common()), ""]
    else:
        lines += ["No failures: every case ended with exit 0, or exit 2 and one `error: ...` line.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000, help="how many cases (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed; cases use seed..seed+cases-1")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds a case may take (default 20: most take milliseconds, the slowest about one "
                             "second, more on a loaded machine)")
    parser.add_argument("--output", default="profile_fuzz", help="results file stem in benchmarks/results/")
    parser.add_argument("--progress", type=int, default=500, help="a progress line every N cases (0: none)")
    args = parser.parse_args()

    began = time.perf_counter()
    try:
        outcomes = run_all(args.seed, args.cases, args.timeout, args.progress)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    seconds = time.perf_counter() - began
    failures = [o for o in outcomes if o.problem]
    for outcome in failures:
        print("=" * 100)
        print(outcome.report())
    report = summarize(outcomes, args, seconds)
    print("=" * 100)
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.md").write_text(report)
    print(f"written: {RESULTS / (args.output + '.md')}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
