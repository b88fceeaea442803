"""`lowmem-tune data`: the profile's data as a run would tokenize it, without a model."""

from __future__ import annotations

import json

from click.testing import CliRunner
from test_train import tiny_profile, write_profile

from lowmem_tune.cli import main


def invoke(tmp_path, *args: str, **sections):
    path = write_profile(tmp_path, tiny_profile(tmp_path / "run", **sections))
    return CliRunner().invoke(main, ["data", str(path), *args])


def test_piped_output_states_the_facts_and_brackets_the_trained_spans(tmp_path):
    result = invoke(tmp_path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "synthetic-boolq (format boolq)" in out
    assert "96: 80 train, 16 held-out" in out
    assert "p50 34, p90 34, p99 34, max 34 against data.max_seq_len 48: 0 longer" in out
    assert "all 80 fit whole (data.truncation cut_prompt)" in out
    assert "carry loss (data.train_on_prompt false: answers only)" in out
    assert out.count("--- example ") == 2  # --examples 2 by default
    # CliRunner is not a terminal: brackets, no colour; the answer and its EOS are trained, nothing else
    assert "\x1b[" not in out
    assert "between [[ and ]]" in out
    shown = out.split("--- example ", 1)[1]
    assert shown.count("[[") == 2 and ("Answer:[[ yes</s>]]" in shown or "Answer:[[ no</s>]]" in shown)
    assert not (tmp_path / "run").exists()  # nothing written: the local tokenizer stays in memory


def test_cuts_and_drops_are_counted_and_shown(tmp_path):
    result = invoke(tmp_path, "--examples", "1", "--set", "data.max_seq_len=30")
    assert result.exit_code == 0, result.output
    assert "of 80: 0 whole, 80 prompts cut from the left (data.truncation cut_prompt)" in result.stdout
    assert "example 1: 30 of 34 tokens, prompt cut from the left" in result.stdout
    result = invoke(tmp_path, "--examples", "1", "--set", "data.max_seq_len=30", "--set", "data.truncation=drop")
    assert "of 80: 0 whole, 80 dropped (longer than data.max_seq_len)" in result.stdout
    assert "a run      would stop: data: all 80 training examples are longer than data.max_seq_len 30" in result.stdout
    assert "example 1: 34 tokens, dropped (shown whole)" in result.stdout


def test_json_is_one_document_of_the_same_facts(tmp_path):
    result = invoke(tmp_path, "--json", "--examples", "3", "--set", "data.max_seq_len=30")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert set(facts) == {"dataset", "format", "examples", "tokenizer", "chat_template", "max_seq_len", "truncation",
                          "train_on_prompt", "packing", "lengths", "over_max_seq_len", "train", "heldout", "note",
                          "run_error", "samples"}
    assert facts["format"] == "boolq" and facts["examples"] == {"total": 96, "train": 80, "heldout": 16}
    assert set(facts["lengths"]) == {"p50", "p90", "p99", "max"} and facts["over_max_seq_len"] == 80
    assert {k: facts["train"][k] for k in ("whole", "prompt_cut", "text_cut", "dropped")} == \
        {"whole": 0, "prompt_cut": 80, "text_cut": 0, "dropped": 0}
    assert facts["train"]["tokens"] == 80 * 30 and facts["train"]["loss_tokens"] == 80 * 2
    assert facts["note"].startswith("data: 80 of 80 prompts cut from the left") and facts["run_error"] is None
    assert len(facts["samples"]) == 3
    sample = facts["samples"][0]
    assert sample["outcome"] == "prompt_cut" and sample["tokens"] == 30
    assert [s["trained"] for s in sample["spans"]] == [False, True] and sample["spans"][1]["text"].endswith("</s>")


def test_a_bad_profile_or_missing_data_is_one_line_exit_2(tmp_path):
    for args in (["--set", "data.truncation=cut"], ["--set", "data.dataset=/nonexistent/data.jsonl"],
                 ["--examples", "-1"]):
        result = invoke(tmp_path, *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = CliRunner().invoke(main, ["data", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and result.stderr.startswith("error: profile not found")
