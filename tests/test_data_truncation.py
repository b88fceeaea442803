"""data.truncation: examples longer than data.max_seq_len keep their whole answer and EOS (the
prompt is cut from the left, BOS staying first) or are dropped, text is cut at the end, and the run
says what was done."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from test_eval_support import with_bos
from test_train import Recorder, tiny_profile, write_profile

from lowmem_tune.cli import main
from lowmem_tune.data import IGNORE_INDEX, Example, tokenize_examples, train_local_tokenizer
from lowmem_tune.data.tokenize import check_kept, encode, pack, tokenize_example
from lowmem_tune.errors import UserError
from lowmem_tune.events import Info
from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train import run_training

WORDS = "the quick brown fox jumps over the lazy dog while seven clever cats sleep under a warm red blanket"


@pytest.fixture(scope="module")
def tokenizer():
    return train_local_tokenizer([WORDS] * 4, 300)


def ids(tokenizer, text: str) -> list[int]:
    return encode(tokenizer, [text], bos=False)[0]


PROMPT = "the quick brown fox jumps over the lazy dog while seven clever cats"
ANSWER = " sleep under a warm red blanket"


@pytest.mark.parametrize("bos", [False, True])
def test_an_example_that_fits_is_prompt_response_eos_under_both_policies(tokenizer, bos):
    tok = with_bos(tokenizer) if bos else tokenizer
    prompt, answer = ids(tok, PROMPT), ids(tok, ANSWER) + [tok.eos_token_id]
    head = [tok.bos_token_id] if bos else []
    for truncation in ("cut_prompt", "drop"):
        done = tokenize_example(Example(PROMPT, ANSWER), tok, 200, False, bos, truncation)
        assert done.outcome == "whole" and done.length == len(head + prompt + answer)
        assert done.item == {"input_ids": head + prompt + answer,
                             "labels": [IGNORE_INDEX] * len(head + prompt) + answer}


@pytest.mark.parametrize("bos", [False, True])
def test_cut_prompt_keeps_the_whole_answer_its_eos_and_the_end_of_the_prompt(tokenizer, bos):
    tok = with_bos(tokenizer) if bos else tokenizer
    prompt, answer = ids(tok, PROMPT), ids(tok, ANSWER) + [tok.eos_token_id]
    head = [tok.bos_token_id] if bos else []
    max_len = len(head) + len(answer) + 3
    done = tokenize_example(Example(PROMPT, ANSWER), tok, max_len, False, bos)
    assert done.outcome == "prompt_cut"
    assert done.item["input_ids"] == head + prompt[-3:] + answer  # BOS first, the prompt's last 3 tokens
    assert done.item["labels"] == [IGNORE_INDEX] * (len(head) + 3) + answer
    assert done.item["input_ids"][-1] == tok.eos_token_id and len(done.item["input_ids"]) == max_len
    with_prompt = tokenize_example(Example(PROMPT, ANSWER), tok, max_len, True, bos)
    assert with_prompt.item["labels"] == head + prompt[-3:] + answer  # data.train_on_prompt: the kept prompt


@pytest.mark.parametrize("bos", [False, True])
def test_an_answer_longer_than_max_seq_len_is_dropped_never_cut(tokenizer, bos):
    tok = with_bos(tokenizer) if bos else tokenizer
    answer = len(ids(tok, ANSWER)) + 1 + bos
    for truncation in ("cut_prompt", "drop"):
        done = tokenize_example(Example(PROMPT, ANSWER), tok, answer - 1, False, bos, truncation)
        assert done.item is None and done.outcome == "dropped" and done.answer == answer
    # exactly the answer's length: kept under cut_prompt (no prompt token left), dropped under drop
    assert tokenize_example(Example(PROMPT, ANSWER), tok, answer, False, bos).outcome == "prompt_cut"
    assert tokenize_example(Example(PROMPT, ANSWER), tok, answer, False, bos, "drop").outcome == "dropped"


@pytest.mark.parametrize("bos", [False, True])
def test_text_without_a_prompt_is_cut_at_max_seq_len_or_dropped(tokenizer, bos):
    tok = with_bos(tokenizer) if bos else tokenizer
    text = ids(tok, WORDS)
    head = [tok.bos_token_id] if bos else []
    done = tokenize_example(Example("", WORDS), tok, 5, False, bos)
    assert done.outcome == "text_cut" and done.length == len(head) + len(text) + 1
    assert done.item["input_ids"] == (head + text)[:5]  # the beginning, BOS first; EOS lost
    assert done.item["labels"] == ([IGNORE_INDEX] if bos else []) + text[: 5 - len(head)]
    assert tokenize_example(Example("", WORDS), tok, 5, False, bos, "drop").outcome == "dropped"
    whole = tokenize_example(Example("", WORDS), tok, 500, False, bos)
    assert whole.outcome == "whole" and whole.item["input_ids"] == head + text + [tok.eos_token_id]


def test_the_report_counts_each_outcome_and_the_tokens_that_carry_loss(tokenizer):
    answer = len(ids(tokenizer, ANSWER)) + 1
    max_len = answer + 2
    examples = [
        Example("seven", " cats"),  # fits
        Example(PROMPT, ANSWER),  # prompt cut
        Example("the", ANSWER + ANSWER),  # answer too long: dropped
        Example("", WORDS),  # text: cut
        Example("a", " dog"),  # fits
    ]
    items, report = tokenize_examples(examples, tokenizer, max_len, False, packing=False)
    assert (report.examples, report.whole, report.prompt_cut, report.text_cut, report.dropped) == (5, 2, 1, 1, 1)
    assert report.kept == 4 and len(items) == 4 and report.changed
    assert report.tokens == sum(len(i["input_ids"]) for i in items)
    # the loss predicts each token from those before it: the first token of a sequence is never a target
    assert report.loss_tokens == sum(sum(x != IGNORE_INDEX for x in i["labels"][1:]) for i in items)
    assert 0 < report.loss_share < 1
    assert report.longest_answer == len(ids(tokenizer, WORDS)) + 1  # the text counts as its own answer
    assert report.percentiles()["max"] == max(report.lengths) and len(report.lengths) == 5
    note = report.summary(max_len, "cut_prompt")
    assert note == (f"1 of 5 prompts cut from the left to fit data.max_seq_len {max_len}; 1 of 5 texts cut at "
                    f"data.max_seq_len {max_len} (their ends are not trained on); 1 dropped (the answer alone is "
                    "longer)")
    _, dropping = tokenize_examples(examples, tokenizer, max_len, False, packing=False, truncation="drop")
    assert (dropping.whole, dropping.prompt_cut, dropping.text_cut, dropping.dropped) == (2, 0, 0, 3)
    assert dropping.summary(max_len, "drop") == (f"3 of 5 examples dropped: longer than data.max_seq_len {max_len} "
                                                 "(data.truncation: drop)")
    _, fitting = tokenize_examples(examples[:1], tokenizer, max_len, False, packing=False)
    assert not fitting.changed and fitting.summary(max_len, "cut_prompt") == ""


def test_packing_packs_the_kept_items(tokenizer):
    examples = [Example("seven", " cats"), Example(PROMPT, ANSWER + ANSWER), Example("a", " dog"),
                Example(PROMPT, ANSWER)]
    max_len = len(ids(tokenizer, ANSWER)) + 4
    kept, _ = tokenize_examples(examples, tokenizer, max_len, False, packing=False)
    packed, report = tokenize_examples(examples, tokenizer, max_len, False, packing=True)
    assert report.dropped == 1 and len(kept) == 3
    assert packed == pack(kept, max_len) and all(len(i["input_ids"]) <= max_len for i in packed)
    assert report.tokens == sum(len(i["input_ids"]) for i in kept)


def test_every_example_dropped_is_one_line_naming_max_seq_len_and_the_longest_answer(tokenizer):
    answer = len(ids(tokenizer, ANSWER)) + 1
    _, report = tokenize_examples([Example(PROMPT, ANSWER)] * 3, tokenizer, answer - 1, False, packing=False)
    with pytest.raises(UserError) as err:
        check_kept(report, answer - 1, "cut_prompt")
    text = str(err.value)
    assert "\n" not in text and f"data.max_seq_len {answer - 1}" in text and f"longest answer: {answer} tokens" in text
    _, report = tokenize_examples([Example(PROMPT, ANSWER)] * 3, tokenizer, answer + 1, False, packing=False,
                                  truncation="drop")
    with pytest.raises(UserError, match="data.truncation is drop"):
        check_kept(report, answer + 1, "drop")


def test_a_run_that_cuts_prompts_says_so_once_at_start(tmp_path):
    # synthetic-boolq examples are 34 tokens with the tiny local tokenizer; answers 2 ( yes/no, EOS)
    raw = tiny_profile(tmp_path / "run", data={"max_seq_len": 30},
                       train={"max_steps": 1, "save_every": 1000, "eval_every": 1000})
    recorder = Recorder()
    outcome = run_training(profile_from_dict(raw), resume=False, sink=recorder)
    assert outcome.status == "completed"
    notes = [e.message for e in recorder.events if isinstance(e, Info) and e.message.startswith("data:")]
    assert notes == ["data: 80 of 80 prompts cut from the left to fit data.max_seq_len 30; held-out: 16 of 16 "
                     "prompts cut from the left to fit data.max_seq_len 30"]


def test_a_run_whose_examples_fit_says_nothing_about_truncation(tmp_path):
    raw = tiny_profile(tmp_path / "run", train={"max_steps": 1, "save_every": 1000, "eval_every": 1000})
    recorder = Recorder()
    run_training(profile_from_dict(raw), resume=False, sink=recorder)
    assert not [e for e in recorder.events if isinstance(e, Info) and e.message.startswith("data:")]


def test_a_run_that_drops_every_example_is_one_error_line(tmp_path):
    path = write_profile(tmp_path, tiny_profile(tmp_path / "run"))
    result = CliRunner().invoke(main, ["run", str(path), "--headless", "--set", "data.max_seq_len=1"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: data: all 80 training examples are dropped") and \
        len(result.stderr.strip().splitlines()) == 1
    assert "data.max_seq_len 1" in result.stderr and "the longest answer: 2 tokens" in result.stderr
