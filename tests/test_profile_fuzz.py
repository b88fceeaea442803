"""Fuzzed profiles (issue 29, "Load"): whatever a profile holds, `lowmem-tune run` ends with exit 0
or a one-line `error: ...` and exit 2, never a traceback and never a hang.

The cases come from tests/helpers/profile_fuzz.py (seeded; benchmarks/profile_fuzz.py runs
thousands); each runs `run p.yaml --headless` in-process up to the first training step. Below
them, the bad profiles the fuzzing found, each once a traceback, a hang or an invalid value
accepted, now an error that names the key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from profile_fuzz import KEYS, SECTIONS, Case, base_profile, check_case, dump, judge, make_case, run_cases  # noqa: E402

SEEDS = range(200)


def test_fuzzed_profiles_end_in_exit_0_or_one_error_line(tmp_path):
    # Cases take milliseconds (the first of a strategy about a second), a hang forever. The case
    # directories stay for pytest to remove with tmp_path (deleting them here took a quarter of the time).
    outcomes = list(run_cases(SEEDS, tmp_path, timeout_s=15, keep=True))
    failures = [o.report() for o in outcomes if o.problem]
    assert not failures, f"{len(failures)} of {len(outcomes)} cases failed:\n\n" + "\n\n".join(failures)
    exits = {o.exit_code for o in outcomes}
    assert exits == {0, 2}  # both ends are reached: the cases are neither all valid nor all refused


def test_the_generator_covers_every_key_and_is_seeded():
    assert {k.section for k in KEYS} == set(SECTIONS)
    assert len(KEYS) >= 60 and "train.lr" in {k.path for k in KEYS}
    assert make_case(7).text == make_case(7).text and make_case(7).changes == make_case(7).changes
    touched = {change.split(":")[0] for seed in range(1000) for change in make_case(seed).changes}
    assert {k.path for k in KEYS} <= touched


def test_the_judge():
    assert judge(0, "", "") is None
    assert judge(2, "", "error: p.yaml: train.lr: must be positive, got 0.0\n") is None
    assert judge(2, "", "strategy.name=full (--set): full does not read strategy.rank\nerror: x\n") is None
    assert judge(1, "", "") is not None
    assert judge(2, "", "error: first\nsecond line\n") is not None
    assert judge(2, "", "") is not None
    assert judge(2, "Traceback (most recent call last):", "error: x") is not None
    assert judge(0, "", "", ["train.lr: nan is outside its range"]) is not None


def _with(section: str, key: str, value, strategy: str = "full") -> bytes:
    raw = base_profile(strategy)
    raw.setdefault(section, {})[key] = value
    return dump(raw)


# (what, profile file, --set overrides, a fragment of the one error line)
FOUND = [
    ("not UTF-8", b"model: {name: tiny-llama}\ndata: {prompt_template: \"caf\xe9\"}\n", [],
     "line 2 is not UTF-8 text (byte 0xe9)"),
    ("UTF-16", "model: {name: tiny-llama}\n".encode("utf-16"), [], "is not UTF-8 text"),
    ("binary", bytes(range(256)), [], "is not UTF-8 text"),
    ("NUL byte", b"model:\x00 {name: tiny-llama}\n", [], "the character '\\x00' is not allowed"),
    ("deep nesting", b"model: " + b"[" * 5000 + b"]" * 5000 + b"\n", [], "nested too deeply"),
    ("5000 digits", b"train: {max_steps: " + b"9" * 5000 + b"}\n", [], "a value cannot be read"),
    ("impossible date", b"data: {split: 2024-13-45}\n", [], "a value cannot be read"),
    ("int past float range", _with("train", "lr", 10**400), [], "train.lr: expected a finite number"),
    ("float past float range", b"train: {lr: 1e999}\n", [], "train.lr: expected a finite number, got '1e999'"),
    ("NaN lr", _with("train", "lr", float("nan")), [], "train.lr: expected a finite number, got nan"),
    ("NaN margin", _with("hardware", "margin", float("nan")), [], "hardware.margin: expected a finite number"),
    ("inf heldout", _with("data", "heldout", float("inf")), [], "data.heldout: expected a finite number"),
    ("NaN in betas", _with("train", "betas", [float("nan"), 0.999]), [], "train.betas[0]: expected a finite"),
    ("num_examples 10**12 (generated forever)", _with("data", "num_examples", 10**12), [],
     "data.num_examples: must be in [1, 100000]"),
    ("num_examples 1e308", _with("data", "num_examples", 1e308), [],
     "data.num_examples: a 309-digit number is out of range"),
    ("seed 10**30 (torch.manual_seed overflow)", _with("train", "seed", 10**30), [],
     "train.seed: 1000000000000000000000000000000 is out of range"),
    ("seed 2**62 (the batch order's generator seed overflows)", _with("train", "seed", 2**62), [],
     "train.seed: must be in [-4294967296, 4294967296], got 4611686018427387904"),
    ("a key with a line break", b"model: {\"name\\nx\": tiny-llama}\n", [], "unknown key model.'name\\nx'"),
    ("prompt template with a lone brace", _with("data", "prompt_template", "{"), [],
     "data.prompt_template: '{' is not a usable template"),
    ("prompt template with a positional field", _with("data", "prompt_template", "{0}"), [],
     "data.prompt_template: '{0}' is not a usable template"),
    ("response template with an attribute", _with("data", "response_template", "{answer.x}"), [],
     "data.response_template: '{answer.x}' is not a usable template"),
    ("prompt template padding to a huge width", _with("data", "prompt_template", "{question:>999999999999}"), [],
     "pads to a huge width"),
    ("output.dir is a file", _with("output", "dir", "notes.txt"), [], "output.dir notes.txt is a file, not a directory"),
    ("output.dir below a file", _with("output", "dir", "notes.txt/run"), [], "is a file, so no directory can be made"),
    ("output.dir name too long", _with("output", "dir", "x" * 300), [],
     "not usable as a directory (File name too long)"),
    ("model.name too long for a path", _with("model", "name", "x" * 300), [], "model 'xxx"),
    ("data.dataset too long for a path", _with("data", "dataset", "x" * 300 + ".jsonl"), [],
     "data.dataset: 'xxx"),
    ("strategy.compressed_model too long for a path", _with("strategy", "compressed_model", "x" * 300, "welore"), [],
     "not a usable path (File name too long)"),
    ("data.dataset a CSV file that is not UTF-8", _with("data", "dataset", "garbage.csv"), [],
     "data.dataset: could not load 'garbage.csv'"),
    ("data.dataset an empty JSONL file", _with("data", "dataset", "empty.jsonl"), [],
     "data.dataset: empty.jsonl is empty; give a file with records"),
    ("model config.json not UTF-8", _with("model", "name", "model-binary"), [], "not a transformers config.json"),
    ("model config.json a list", _with("model", "name", "model-list"), [],
     "not a transformers config.json (a JSON mapping with a model_type)"),
    ("model config.json with a wrong type", _with("model", "name", "model-types"), [], "not a valid llama config"),
    ("model.tokenizer a directory whose config.json has a wrong type", _with("model", "tokenizer", "model-types"), [],
     "could not load a tokenizer from 'model-types'"),
    ("eval task name too long", _with("eval", "tasks", ["x" * 300]), [], "unknown task 'xxxx"),
    ("galore proj_type full with the default svd", _with("strategy", "proj_type", "full", "galore"), [],
     "strategy.proj_type full needs strategy.svd exact or randomized"),
    ("--set with 5000 digits", dump(base_profile()), ["train.max_steps=" + "9" * 5000],
     "train.max_steps: expected a whole number"),
    ("--set an impossible date", dump(base_profile()), ["data.split=2024-13-45"], "data.split"),
]


@pytest.mark.parametrize("what, text, overrides, fragment", FOUND, ids=[f[0] for f in FOUND])
def test_profiles_the_fuzzing_found_end_in_one_error_line(tmp_path, what, text, overrides, fragment):
    outcome = check_case(Case(0, [what], text, overrides), tmp_path / "case", timeout_s=20)
    assert outcome.problem is None, outcome.report()
    assert outcome.exit_code == 2, outcome.report()
    error = outcome.stderr.strip().splitlines()[-1]
    assert fragment in error, error
    assert len(error) < 600, error


@pytest.mark.parametrize("name", ["x" * 300, "a\x00b"], ids=["too long", "NUL"])
def test_a_profile_path_no_file_system_takes_is_not_found(name):
    from lowmem_tune.errors import UserError
    from lowmem_tune.profile import load_profile

    with pytest.raises(UserError, match="profile not found") as err:
        load_profile(name)  # was an OSError (File name too long) from Path.is_file
    assert "\n" not in str(err.value) and "\x00" not in str(err.value)


@pytest.mark.parametrize("text", [b"[]\n", b"0\n", b"false\n", b"''\n"])
def test_a_file_holding_an_empty_list_or_a_false_value_is_not_a_profile(tmp_path, text):
    from lowmem_tune.errors import UserError
    from lowmem_tune.profile import load_profile

    (tmp_path / "p.yaml").write_bytes(text)
    with pytest.raises(UserError, match="a profile is a mapping of sections"):
        load_profile(tmp_path / "p.yaml")  # was read as an empty profile, all defaults
    (tmp_path / "p.yaml").write_bytes(b"# comments only\n")
    assert load_profile(tmp_path / "p.yaml").model.name == "demo-llama"  # an empty file still is one
