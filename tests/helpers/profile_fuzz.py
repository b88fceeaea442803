"""Seeded fuzzing of run profiles (issue 29, "Load"): shared by tests/test_profile_fuzz.py (a few
hundred cases) and benchmarks/profile_fuzz.py (thousands).

`make_case(seed)` takes a small valid tiny-llama CPU profile and changes one to three of its keys,
drawn from every field of every section of `lowmem_tune.profile.Profile` (enumerated from the
dataclasses, so a key added there is fuzzed without touching this file), to values of random
kinds: valid ones, wrong types, out-of-range numbers (NaN and infinities included), nulls, empty,
very long and odd strings, paths that do not exist or name the wrong kind of file; or it adds
unknown keys and sections, or makes a section something other than a mapping. A few cases
corrupt the whole file instead (not a mapping, invalid YAML, empty, binary, not UTF-8). Some
cases give one change as `--set SECTION.KEY=VALUE` instead of in the file.

`check_case(case, workdir)` runs `lowmem-tune run PROFILE --headless` in-process through click's
CliRunner with the run asked to stop before its first step: loading, validation and the whole of
the run's setup (device, data, tokenizer, task cards, strategy, model, updater) happen, training
does not. A case passes when it ends with exit 0, or exit 2 and one `error: ...` line on stderr
(after any notes), with no traceback and within the time limit; a case whose profile certainly
holds an invalid number (NaN, an infinity, a value outside its key's bounds) must end in exit 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import signal
import time
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Union

import yaml

from lowmem_tune.profile import STRATEGY_NAMES, Profile
from lowmem_tune.schema import applies_to, bounds_of

# --------------------------------------------------------------------------- the schema, enumerated

SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Profile)[f.name] for f in dataclasses.fields(Profile)}
"""Section name -> its dataclass."""


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    hint: Any
    field: dataclasses.Field

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"


KEYS: list[Key] = [
    Key(section, f.name, typing.get_type_hints(cls)[f.name], f)
    for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
]
"""Every key of every section."""

CHEAP_STRATEGIES = ("full", "galore", "fira", "lisa", "welore")
"""Strategies whose setup takes tens of milliseconds on tiny-llama (adamw8bit loads bitsandbytes,
owlore calibrates: both are drawn when a key needs them)."""


def base_profile(strategy: str = "full") -> dict[str, Any]:
    """A small valid profile whose setup takes tens of milliseconds on a CPU (output relative to
    the case directory)."""
    raw: dict[str, Any] = {
        "model": {"name": "tiny-llama", "init": "random"},
        "hardware": {"device": "cpu"},
        "strategy": {"name": strategy},
        "data": {"dataset": "synthetic-boolq", "num_examples": 48, "max_seq_len": 32, "heldout": 8},
        "train": {"max_steps": 2, "micro_batch_size": 2, "activation_checkpointing": False, "seed": 1},
        "output": {"dir": "run"},
    }
    if strategy in ("galore", "fira", "apollo", "apollo-mini", "lisa", "owlore", "welore"):
        raw["strategy"].update(rank=8, update_proj_gap=2)
    if strategy == "owlore":
        raw["strategy"].update(calibration_samples=2, calibration_seq_len=16)
    return raw


# --------------------------------------------------------------------------- files a case can name

FIXTURE_FILES: dict[str, bytes] = {
    "notes.txt": b"The red box holds 3 coins. The blue box holds 5 coins.\n" * 4,
    "garbage.json": b"{not json at all",
    "garbage.jsonl": b"[1, 2\n{\"a\": \n",
    "garbage.csv": b"\x00\x01\x02,\xff\xfe\n",
    "empty.jsonl": b"",
    "fields.jsonl": b'{"foo": 1, "bar": "x"}\n{"foo": 2, "bar": "y"}\n',
    "blob.bin": bytes(range(256)),
    "config.json": b'{"model_type": "nonsense"}',
    "sub/readme.txt": b"a directory with no config.json or dataset in it\n",
    "model-binary/config.json": bytes(range(256)),
    "model-list/config.json": b"[1, 2]",
    "model-types/config.json": b'{"model_type": "llama", "hidden_size": "big", "num_hidden_layers": -1}',
    "saved-empty/state.json": b"{}",
    "saved-bad/dataset_dict.json": b"not json",
    "blank.jsonl": b"\n\n  \n",
    "bad.parquet": b"not parquet",
    "scalar.json": b'"x"',
}
"""Written into every case directory (the working directory of the run), so relative paths in a
profile name these."""

PATHS_THAT_DO_NOT_WORK = [
    "does/not/exist", "does-not-exist.jsonl", "./nope", "/nonexistent/model", "~/nonexistent-lowmem-tune",
    "notes.txt", "garbage.json", "garbage.jsonl", "garbage.csv", "empty.jsonl", "fields.jsonl", "blob.bin",
    "config.json", "sub", ".", "notes.txt/below", "x" * 300, "a/" * 200 + "b", "model-binary", "model-list",
    "model-types", "model-binary/config.json", "saved-empty", "saved-bad", "blank.jsonl", "bad.parquet",
    "scalar.json", "owner/name", "owner/" + "n" * 300,
]
"""Paths for fields that read a file or directory: missing ones, existing ones of the wrong
kind, a file used as a directory, names too long for the file system."""

OUTPUT_DIRS = ["run-2", "nested/deeper/run", "notes.txt/run", "notes.txt", "sub", "x" * 300, "a/" * 200 + "b",
               "", " ", "."]
"""For output.dir: all relative (the run writes there; nothing lands outside the case directory)."""

PATH_KEYS = {"model.name", "model.tokenizer", "data.dataset", "strategy.calibration_file",
             "strategy.compressed_model", "data.chat_template"}

ODD_STRINGS = [
    "", " ", "\t", "\n", "yes", "no", "null", "~", "0", "1e-4", "-1", "nan", "[1, 2]", "{a: 1}",
    "{", "}", "{0}", "{question", "{question.x}", "{question[0]}", "{!r}", "%s %d", "{{}}", "{question:d}",
    "{question:>999999999999}", "{question:>99999999999999999999}", "{answer!x}", "{idx[0]}",
    "ünïcödé ✓", "名前", "\u200b", "a\x00b", "\\", "'", '"', "../../../etc/passwd",
    "-" * 40, "x" * 5000, "line one\nline two", "tiny-llama ", "TINY-LLAMA",
]

VALID_STRINGS: dict[str, list[Any]] = {
    "model.name": ["tiny-llama", "tiny-gemma3"],
    "model.tokenizer": [None],
    "model.revision": [None],
    "hardware.gpu": ["auto", "rtx4090", "24GB", "24GiB", "16000MiB"],
    "data.dataset": ["synthetic-boolq", "fields.jsonl", "notes.txt"],
    "data.config_name": [None, "default"],
    "data.split": ["train", "validation"],
    "data.prompt_template": [None, "Q: {question}\nA:", "{passage} {question}?", ""],
    "data.response_template": [None, " {answer}", "{answer}"],
    "data.chat_template": [None, None, "chatml", "llama3"],
    "strategy.calibration_file": [None, "notes.txt"],
    "strategy.compressed_model": [None],
    "output.dir": ["run-2", "nested/run"],
}

TASKS = ["boolq", "piqa", "commonsense", "arc_easy"]

WRONG_TYPES: list[Any] = ["four", "", "true", 7, -3, 2.5, True, False, None, [], [1, 2], ["a", None],
                          {}, {"a": 1}, {"nested": {"deep": [1]}}, [[1]]]

HUGE_INTS = [10**12, 2**63, 2**64 + 1, 10**30, 10**400]
OUT_OF_RANGE_NUMBERS: list[Any] = [-1, 0, -10**9, -1.0, 0.0, -1e-12, 1e308, 0.5, 1.5, 1.0, 2.0,
                                   math.nan, math.inf, -math.inf, *HUGE_INTS]


# --------------------------------------------------------------------------- values


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = typing.get_args(hint)
        inner = [a for a in args if a is not type(None)]
        return inner[0], type(None) in args
    return hint, False


def valid_value(key: Key, rng: random.Random) -> Any:
    """A value of the right type, in range, that a tiny CPU run can set up with."""
    if key.path in VALID_STRINGS:
        return rng.choice(VALID_STRINGS[key.path])
    hint, optional = _unwrap(key.hint)
    if optional and rng.random() < 0.2:
        return None
    origin = typing.get_origin(hint)
    bounds = bounds_of(key.field)
    if origin is Literal:
        return rng.choice(typing.get_args(hint))
    if hint is bool:
        return rng.random() < 0.5
    if hint is int:
        if bounds is not None and bounds.low is not None:
            low = int(bounds.low) + (1 if bounds.low_open and float(bounds.low).is_integer() else 0)
            value = rng.choice([low, low + 1, low + rng.randint(0, 8), low + rng.randint(0, 64)])
            return value if bounds.holds(value) else low
        return rng.randint(-2**31, 2**31)
    if hint is float:
        if bounds is None:
            return rng.uniform(-10, 10)
        low = bounds.low if bounds.low is not None else -10.0
        high = bounds.high if bounds.high is not None else low + 10.0
        value = rng.uniform(low, high)
        if key.path == "train.lr":
            value = 10 ** rng.uniform(-6, -1)
        if not bounds.holds(value):
            value = (low + high) / 2
        return value
    if origin is list:
        (inner,) = typing.get_args(hint)
        if key.path == "eval.tasks":
            return rng.sample(TASKS, rng.randint(0, 2))
        if inner is float:  # betas
            return [rng.uniform(0.0, 0.999) for _ in range(2)]
        return [f"item{i}" for i in range(rng.randint(0, 2))]
    if origin is dict:
        if key.path == "eval.data_files":
            return rng.choice([{}, {"boolq": "notes.txt"}])
        return {}
    if hint is str:
        return rng.choice(["value", "x", "abc-def"])
    raise TypeError(f"no valid value for {key.path}: {key.hint!r}")  # a new field type: teach this file


def wrong_type(key: Key, rng: random.Random) -> Any:
    hint, optional = _unwrap(key.hint)
    candidates = [v for v in WRONG_TYPES if not (v is None and optional)]
    return rng.choice(candidates)


def out_of_range(key: Key, rng: random.Random) -> Any:
    bounds = bounds_of(key.field)
    picks = list(OUT_OF_RANGE_NUMBERS)
    if bounds is not None:
        for edge in (bounds.low, bounds.high):
            if edge is not None:
                picks += [edge, edge - 1e-9, edge + 1e-9, -edge]
    value = rng.choice(picks)
    hint, _ = _unwrap(key.hint)
    if typing.get_origin(hint) is list:  # betas: one bad number among good ones
        return rng.choice([[value, 0.999], [0.9, value], [value], [0.9, 0.99, 0.999], []])
    return value


def odd_string(key: Key, rng: random.Random) -> Any:
    if key.path in PATH_KEYS:
        return rng.choice(PATHS_THAT_DO_NOT_WORK + ODD_STRINGS)
    if key.path == "output.dir":
        return rng.choice(OUTPUT_DIRS)
    return rng.choice(ODD_STRINGS)


def out_of_bounds(key: Key, value: Any) -> bool:
    """`value` is a number `key` certainly refuses: not finite, or outside the key's bounds."""
    hint, _ = _unwrap(key.hint)
    numbers = value if isinstance(value, list) and typing.get_origin(hint) is list else [value]
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if isinstance(number, float) and not math.isfinite(number):
            if hint in (int, float) or typing.get_args(hint) == (float,):
                return True
            continue
        bounds = bounds_of(key.field)
        if bounds is not None and (hint in (int, float) or typing.get_args(hint) == (float,)):
            if hint is int and isinstance(number, float) and not number.is_integer():
                continue  # refused as not whole, which the case checks anyway
            if not bounds.holds(number):
                return True
    return False


def mutated_value(key: Key, rng: random.Random) -> tuple[str, Any]:
    """(the kind of value, the value) for `key`."""
    hint, _ = _unwrap(key.hint)
    numeric = hint in (int, float) or (typing.get_origin(hint) is list and typing.get_args(hint) == (float,))
    kinds = ["valid", "valid", "wrong type", "null", "string"]
    if numeric:
        kinds += ["out of range", "out of range", "huge"]
    if key.path in PATH_KEYS or key.path == "output.dir":
        kinds += ["string", "string"]
    if typing.get_origin(hint) is dict:
        kinds += ["mapping"]
    if typing.get_origin(hint) is list:
        kinds += ["list"]
    kind = rng.choice(kinds)
    if kind == "valid":
        return kind, valid_value(key, rng)
    if kind == "wrong type":
        return kind, wrong_type(key, rng)
    if kind == "null":
        return kind, None
    if kind == "string":
        return kind, odd_string(key, rng)
    if kind == "out of range":
        return kind, out_of_range(key, rng)
    if kind == "huge":
        return kind, rng.choice(HUGE_INTS + [1e300, -1e300, 2**53 + 1])
    if kind == "mapping":  # eval.data_files: odd keys and values
        return kind, rng.choice([
            {"boolq": rng.choice(PATHS_THAT_DO_NOT_WORK)}, {"nosuchtask": "notes.txt"}, {"boolq": None},
            {"boolq": ["a"]}, {1: "notes.txt"}, {"": ""}, {"boolq": {"x": 1}},
        ])
    if kind == "list":  # eval.tasks, train.betas
        return kind, rng.choice([[None], [1, 2], ["boolq", "boolq"], ["nosuchtask"], [""], [[]], [{}],
                                 ["x" * 500], ["../boolq"], ["a\x00b"], ["BOOLQ"], ["commonsense", "boolq"]])
    raise AssertionError(kind)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    seed: int
    changes: list[str]
    """What was changed, one line each (for the report)."""
    text: bytes
    """The profile file."""
    overrides: list[str] = field(default_factory=list)
    must_fail: list[str] = field(default_factory=list)
    """Why this profile is certainly invalid (a number outside its key's range, NaN, an infinity):
    such a case must end in exit 2, not be accepted."""

    def describe(self) -> str:
        head = f"seed {self.seed}: " + "; ".join(self.changes)
        sets = "".join(f" --set {o!r}" for o in self.overrides)
        try:
            body = self.text.decode()
        except UnicodeDecodeError:
            body = repr(self.text)
        if len(body) > 2000:
            body = body[:2000] + f"... ({len(body)} characters)"
        return f"{head}{sets}\n{body}"


def flow(value: Any) -> str:
    """`value` as one line of YAML (a --set value)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def dump(raw: Any) -> bytes:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=10**9).encode()


FILE_CORRUPTIONS: list[tuple[str, bytes]] = [
    ("empty file", b""),
    ("only a comment", b"# nothing here\n"),
    ("a list", b"- model\n- train\n"),
    ("a scalar", b"42\n"),
    ("a string", b"just some words\n"),
    ("null", b"null\n"),
    ("invalid YAML: unclosed bracket", b"model: [unclosed\n"),
    ("invalid YAML: bad indentation", b"model:\n  name: tiny-llama\n bad: 1\n"),
    ("invalid YAML: tab indentation", b"model:\n\tname: tiny-llama\n"),
    ("invalid YAML: unclosed quote", b"model: {name: \"tiny-llama}\n"),
    ("python tag", b"model: !!python/object/apply:os.system ['true']\n"),
    ("binary bytes", bytes(range(256)) * 4),
    ("NUL bytes", b"model:\x00 {name: tiny-llama}\n"),
    ("not UTF-8", b"model: {name: tiny-llama}\ndata: {prompt_template: \"caf\xe9 {question}\"}\n"),
    ("UTF-16", "model: {name: tiny-llama}\n".encode("utf-16")),
    ("duplicate anchors", b"a: &x 1\nb: *y\n"),
    ("list key", b"? [a, b]\n: 1\n"),
    ("deep nesting", b"model: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("alias bomb", b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                   b"model: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"),
    ("two documents", b"model: {name: tiny-llama}\n---\ntrain: {lr: 1}\n"),
    ("integer section names", b"1: {a: 1}\n"),
    ("null section name", b"~: {a: 1}\n"),
    ("a 5000-digit number", b"train: {max_steps: " + b"9" * 5000 + b"}\n"),
    ("a key with a line break", b"model: {\"name\\nx\": tiny-llama}\n"),
    ("a float past float's range", b"train: {lr: 1e999}\n"),
    ("an impossible date", b"data: {split: 2024-13-45}\n"),
    ("a date", b"data: {split: 2024-01-02}\n"),
    ("binary tag", b"model: {name: !!binary \"not base64!\"}\n"),
]


def make_case(seed: int) -> Case:
    """The case for `seed`: the same seed gives the same case."""
    rng = random.Random(f"profile-fuzz-{seed}")
    if rng.random() < 0.05:
        what, text = rng.choice(FILE_CORRUPTIONS)
        return Case(seed, [f"whole file: {what}"], text)
    keys = rng.sample(KEYS, rng.randint(1, 3))
    # A strategy key is set mostly with a strategy that reads it (else it is refused at once).
    strategy = "full"
    readers = [set(applies_to(k.field) or STRATEGY_NAMES) for k in keys if k.section == "strategy"]
    if readers and rng.random() < 0.85:
        common = set.intersection(*readers) or readers[0]
        cheap = sorted(common & set(CHEAP_STRATEGIES)) or sorted(common)
        strategy = rng.choice(cheap)
    raw = base_profile(strategy)
    changes: list[str] = [f"base strategy {strategy}"] if strategy != "full" else []
    overrides: list[str] = []
    must_fail: dict[str, tuple[str, bool]] = {}  # key path -> (why, given with --set)
    for key in keys:
        roll = rng.random()
        if roll < 0.06:
            raw[key.section].pop(key.name, None) if isinstance(raw.get(key.section), dict) else None
            changes.append(f"{key.path}: removed")
            continue
        kind, value = mutated_value(key, rng)
        by_set = roll < 0.22 and "\x00" not in str(value)
        if out_of_bounds(key, value):
            must_fail[key.path] = (f"{key.path}: {value!r:.40} is outside its range", by_set)
        if by_set:
            overrides.append(f"{key.path}={flow(value)}")
            changes.append(f"{key.path}: {kind} {value!r:.80} (--set)")
        else:
            section = raw.setdefault(key.section, {})
            if isinstance(section, dict):
                section[key.name] = value
            changes.append(f"{key.path}: {kind} {value!r:.80}")
    # Structural changes, now and then.
    structural = rng.random()
    if structural < 0.04:
        section = rng.choice(list(SECTIONS))
        name = rng.choice(["learning_rate", "max_step", "nmae", "foo", "", "0", "strategy", "line\nbreak", "k" * 300])
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section][name] = rng.choice([1, "x", None])
        changes.append(f"unknown key {section}.{name!r}")
    elif structural < 0.07:
        name = rng.choice(["training", "models", "extra", "optimizer", "", "0"])
        raw[name] = rng.choice([{"a": 1}, 1, None, [1]])
        changes.append(f"unknown section {name!r}")
    elif structural < 0.10:
        section = rng.choice(list(SECTIONS))
        raw[section] = rng.choice([None, [], [1, 2], "text", 3, True, {}])
        changes.append(f"section {section}: {raw[section]!r}")
        for path, (_, by_set) in list(must_fail.items()):  # the file's values in it are gone
            if path.startswith(f"{section}.") and not by_set:
                del must_fail[path]
    elif structural < 0.12:
        section = rng.choice(list(SECTIONS))
        name = rng.choice(['foo', 'x.y', '', 'max_steps'])
        value = rng.choice(["1", "", "a=b", "[unclosed", "9" * 5000, "{a: [1", "2024-13-45"])
        overrides.append(f"{section}.{name}={value}")
        changes.append(f"odd --set {overrides[-1]!r:.120}")
        must_fail.pop(f"{section}.{name}", None)  # set again, last
    return Case(seed, changes, dump(raw), overrides, [why for why, _ in must_fail.values()])


# --------------------------------------------------------------------------- running a case


class CaseTimeout(BaseException):
    """The per-case time limit (a BaseException, so no `except Exception` in the product eats it)."""


@dataclass
class Outcome:
    case: Case
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    problem: str | None = None
    """None: the case passed; else what was wrong (traceback, hang, exit code, several lines)."""
    traceback: str = ""

    def report(self) -> str:
        parts = [f"FAIL {self.problem}", self.case.describe(), f"exit code: {self.exit_code}"]
        if self.stdout.strip():
            parts.append("stdout:\n" + self.stdout.rstrip()[-3000:])
        if self.stderr.strip():
            parts.append("stderr:\n" + self.stderr.rstrip()[-3000:])
        if self.traceback:
            parts.append(self.traceback.rstrip()[-6000:])
        return "\n".join(parts)


class _StoppedBeforeTraining:
    """Replaces RunControl for `run`: a stop is asked before the first step, so the whole setup
    runs and no step does."""

    def __new__(cls):
        from lowmem_tune.train.control import RunControl

        control = RunControl()
        control.request_stop()
        return control


@contextlib.contextmanager
def setup_only() -> Iterator[None]:
    """While inside: `lowmem-tune run` sets everything up and stops before step 1."""
    import lowmem_tune.train.console as console

    saved = console.RunControl
    console.RunControl = _StoppedBeforeTraining  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        console.RunControl = saved  # type: ignore[misc]


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expired(signum: int, frame: Any) -> None:
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


NOTE_PREFIXES = ("strategy.name=",)
"""Lines `run` prints on stderr before an error (notes about dropped strategy keys)."""


def judge(exit_code: int | None, stdout: str, stderr: str, must_fail: list[str] = ()) -> str | None:
    """What is wrong with how a case ended, or None."""
    if "Traceback" in stdout or "Traceback" in stderr:
        return "a traceback in the output"
    if exit_code == 0 and must_fail:
        return f"accepted an invalid value: {must_fail[0]}"
    if exit_code not in (0, 2):
        return f"exit code {exit_code} (expected 0, or 2 with one error line)"
    if exit_code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        if len(errors) != 1 or not lines or lines[-1] != errors[0]:
            return "exit 2 without exactly one `error: ...` line ending stderr"
        stray = [line for line in lines[:-1] if not line.startswith(NOTE_PREFIXES)]
        if stray:
            return f"exit 2 with more than one line: {stray[0][:120]!r}"
    return None


def prepare_workdir(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for name, data in FIXTURE_FILES.items():
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def check_case(case: Case, workdir: Path, timeout_s: float = 10.0) -> Outcome:
    """Run `lowmem-tune run p.yaml --headless [--set ...]` for `case` in `workdir` (its working
    directory; created with the fixture files), stopping before training. Must be called from the
    main thread (the time limit is SIGALRM)."""
    from click.testing import CliRunner

    from lowmem_tune.cli import main

    prepare_workdir(workdir)
    (workdir / "p.yaml").write_bytes(case.text)
    args = ["run", "p.yaml", "--headless", *(a for o in case.overrides for a in ("--set", o))]
    runner = CliRunner()
    began = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with setup_only(), _time_limit(timeout_s):
            result = runner.invoke(main, args, catch_exceptions=True)
    except CaseTimeout:
        return Outcome(case, None, "", "", time.perf_counter() - began, f"no end within {timeout_s:g}s (a hang)")
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - began
    stdout, stderr = result.stdout, result.stderr
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else repr(exc)
        return Outcome(case, result.exit_code, stdout, stderr, seconds,
                       f"traceback: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}", tb)
    problem = judge(result.exit_code, stdout, stderr, case.must_fail)
    return Outcome(case, result.exit_code, stdout, stderr, seconds, problem)


def warm_up() -> None:
    """Import what a run imports, so that no case's time limit covers (and, expiring, interrupts:
    a module half imported breaks every later case) importing torch, transformers, datasets."""
    import bitsandbytes  # noqa: F401
    import click.testing  # noqa: F401
    import datasets  # noqa: F401
    import pandas  # noqa: F401

    import lowmem_tune.cli  # noqa: F401
    import lowmem_tune.evaluation.runner  # noqa: F401
    import lowmem_tune.train.run  # noqa: F401


def run_cases(seeds: typing.Iterable[int], root: Path, timeout_s: float = 10.0,
              keep: bool = False) -> Iterator[Outcome]:
    """check_case for each seed, each in its own directory under `root` (removed unless `keep`)."""
    warm_up()
    for seed in seeds:
        workdir = root / f"case-{seed}"
        outcome = check_case(make_case(seed), workdir, timeout_s)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        yield outcome
