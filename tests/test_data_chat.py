"""Chat formats (messages, sharegpt): rendered by a chat template, the loss on every assistant answer
and the marker that closes its turn and on nothing else, one BOS, truncation by whole exchanges,
`lowmem-tune data` and a run.

Each template family is tried on a tokenizer built here with `tokenizers`, whose special tokens are
those the family's template writes, and with the family's BOS behaviour (Llama 3, Gemma and
Mistral tokenizers put BOS in front on their own; Qwen's ChatML tokenizer has no BOS)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_train import Recorder, tiny_profile, write_profile

from lowmem_tune.cli import main
from lowmem_tune.data import IGNORE_INDEX, Example, tokenize_examples, train_local_tokenizer
from lowmem_tune.data.chat import ChatTemplate, chat_template_for, conversation, shipped_template
from lowmem_tune.data.examples import detect_format, render_examples
from lowmem_tune.data.tokenize import bos_first, check_kept, tokenize_example
from lowmem_tune.errors import UserError
from lowmem_tune.profile import DataSection, profile_from_dict
from lowmem_tune.train import run_training

FAMILIES = {
    # template: (special tokens, bos, eos, pad, the token that closes an assistant turn, tokenizer adds BOS)
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|pad|>", "<|eot_id|>", True),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", "<|im_end|>",
               False),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
              "<end_of_turn>", True),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", "</s>", True),
}

CORPUS = ["the user asks what two and two make and the assistant says four.",
          "be brief. what is the capital of france? paris is. and of italy? rome, of course!",
          "system user assistant model: a short question, a short answer; 0 1 2 3 4 5 6 7 8 9 + = ?",
          " Paris. Rome, of course! Four. Be brief. What is the capital of France? And of Italy?"] * 4

CONVERSATION = (
    ("system", "Be brief."),
    ("user", "What is the capital of France?"),
    ("assistant", "Paris."),
    ("user", "And of Italy?"),
    ("assistant", "Rome, of course!"),
)
ANSWERS = ["Paris.", "Rome, of course!"]


def family_tokenizer(family: str, vocab: int = 420, corpus: list[str] = CORPUS, template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, _, adds_bos = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if vocab >= 384 else []
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                         initial_alphabet=alphabet, show_progress=False))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>" if "<unk>" in specials else None)
    if template:
        fast.chat_template = shipped_template(family)
    assert bos_first(fast) == adds_bos
    return fast


def tokenize(tokenizer, messages, max_seq_len=1000, truncation="cut_prompt", train_on_prompt=False, template=None):
    template = template or chat_template_for(None, tokenizer)
    return tokenize_example(Example("", "", tuple(messages)), tokenizer, max_seq_len, train_on_prompt,
                            bos_first(tokenizer), truncation, template)


def trained_runs(tokenizer, item) -> list[str]:
    """The labelled tokens, decoded run by run (a run: consecutive labelled tokens)."""
    runs, current = [], []
    for token, label in zip(item["input_ids"], item["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]


def expected_runs(family: str, answers: list[str]) -> list[str]:
    closing = FAMILIES[family][4]
    space = " " if family == "mistral" else ""  # "[/INST] answer": the answer's first token carries the space
    return [f"{space}{answer}{closing}" for answer in answers]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_is_on_each_assistant_answer_and_its_end_of_turn_token_only(family):
    tok = family_tokenizer(family)
    done = tokenize(tok, CONVERSATION)
    assert done.outcome == "whole" and done.length == len(done.item["input_ids"])
    assert trained_runs(tok, done.item) == expected_runs(family, ANSWERS)
    closing = tok.convert_tokens_to_ids(FAMILIES[family][4])
    assert sum(label == closing for label in done.item["labels"]) == 2  # both turns' closing tokens, as tokens
    # everything else is the rendered conversation, untrained: the system message, the user turns, headers
    text = tok.decode(done.item["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert "Be brief." in text and "What is the capital of France?" in text and "And of Italy?" in text
    one_turn = tokenize(tok, CONVERSATION[1:3])  # no system message, one exchange
    assert trained_runs(tok, one_turn.item) == expected_runs(family, ANSWERS[:1])


@pytest.mark.parametrize("family", FAMILIES)
def test_one_bos_whether_the_template_writes_it_or_not(family):
    tok = family_tokenizer(family)
    ids = tokenize(tok, CONVERSATION).item["input_ids"]
    if tok.bos_token_id is None:  # ChatML: no BOS at all
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        return
    # Llama 3, Gemma, Mistral: the template writes the BOS text and the tokenizer puts BOS first: one BOS
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # the same tokenizer with the default template (no BOS text in it): the one BOS comes from the BOS rule
    default = ChatTemplate(shipped_template("chatml"), "chatml")
    ids = tokenize(tok, CONVERSATION, template=default).item["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tokenize(tok, CONVERSATION, template=default).item["labels"][0] == IGNORE_INDEX


def test_a_tokenizer_without_a_chat_template_gets_the_default_whose_markers_are_text():
    tok = train_local_tokenizer(CORPUS, 400)  # a base model's: no chat template, no <|im_start|> token
    template = chat_template_for(None, tok)
    assert template.source == shipped_template("chatml") and "default" in template.origin
    done = tokenize(tok, CONVERSATION)
    assert trained_runs(tok, done.item) == [f"{a}<|im_end|>" for a in ANSWERS]
    text = tok.decode(done.item["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>" not in tok.get_vocab()  # plain text, split into ordinary tokens
    # the tokenizer's own template wins over the default, data.chat_template over both
    assert chat_template_for(None, family_tokenizer("gemma")).origin == "the tokenizer's chat template"
    assert chat_template_for("mistral", family_tokenizer("gemma")).source == shipped_template("mistral")


def test_train_on_prompt_trains_every_token():
    tok = family_tokenizer("llama3")
    done = tokenize(tok, CONVERSATION, train_on_prompt=True)
    assert done.item["labels"] == done.item["input_ids"]


def test_an_answer_that_repeats_the_question_is_found_in_its_own_turn():
    # a span found by searching the text for the answer would land on the user's identical turn
    tok = family_tokenizer("chatml")
    messages = [("user", "Paris."), ("assistant", "Paris."), ("user", "assistant"), ("assistant", "assistant")]
    done = tokenize(tok, messages)
    assert trained_runs(tok, done.item) == ["Paris.<|im_end|>", "assistant<|im_end|>"]
    labelled = [i for i, label in enumerate(done.item["labels"]) if label != IGNORE_INDEX]
    assert labelled[0] > 6  # not in the user's turn, which begins the text


def test_a_template_that_renders_the_last_turn_differently_still_trains_each_answer(tmp_path):
    # like templates that open only the last assistant turn with an (empty) reasoning block: the
    # conversation's beginning is not rendered as the beginning of the whole, so each answer is looked up
    # in the whole text from its own turn on (here the user turn before it says the same words)
    mine = tmp_path / "last.jinja"
    mine.write_text(
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' and loop.last -%}"
        "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
        "{%- endfor -%}")
    tok = family_tokenizer("chatml", template=False)
    messages = [("user", "Paris."), ("assistant", "Paris."), ("user", "And of Italy?"), ("assistant", "Rome.")]
    done = tokenize(tok, messages, template=chat_template_for(str(mine), tok))
    text = tok.decode(done.item["input_ids"], skip_special_tokens=False)
    assert text.count("<think>") == 1 and text.index("Paris.") < text.index("<|im_start|>assistant")
    assert trained_runs(tok, done.item) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    first = next(i for i, label in enumerate(done.item["labels"]) if label != IGNORE_INDEX)
    assert tok.decode(done.item["input_ids"][:first]).endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------- formats


def test_messages_and_sharegpt_are_detected_from_the_fields_and_read_as_roles():
    messages = [{"messages": [{"role": r, "content": c} for r, c in CONVERSATION]}]
    sharegpt = [{"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[r], "value": c}
                                   for r, c in CONVERSATION], "id": "x"}]
    assert detect_format(messages, "auto") == "messages" and detect_format(sharegpt, "auto") == "sharegpt"
    for records in (messages, sharegpt):
        examples, fmt = render_examples(records, DataSection(dataset="x.jsonl"))
        assert examples == [Example("", "", CONVERSATION)]
    # sharegpt's system field is the system message; messages after the last answer carry no loss: left out
    record = {"system": "Be brief.", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                                       {"from": "gpt", "value": "Paris."},
                                                       {"from": "human", "value": "Thanks!"}]}
    assert conversation(record, "sharegpt", 0) == CONVERSATION[:3]


@pytest.mark.parametrize("record, fmt, says", [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages", "messages[0].role is 'tool'"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "messages[0].content must be text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "messages",
     "may only come first"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "sharegpt", "conversations[0].from is 'bot'"),
    ({"conversations": ["hi"]}, "sharegpt", "not a mapping"),
])
def test_a_malformed_conversation_is_one_line_naming_the_record(record, fmt, says):
    with pytest.raises(UserError) as err:
        render_examples([record], DataSection(dataset="x.jsonl", format=fmt))
    assert says in str(err.value) and "record 0" in str(err.value) and "\n" not in str(err.value)


def test_chat_template_is_checked_like_other_keys(tmp_path):
    def load(value):
        return profile_from_dict({"data": {"chat_template": value}}, "p.yaml")

    assert load("chatml").data.chat_template == "chatml"
    with pytest.raises(UserError, match=r"p.yaml: data.chat_template: unknown template 'chatm1' \(did you mean "
                                        r"'chatml'\?\) \(shipped: chatml, gemma, llama3, mistral; or a path"):
        load("chatm1")
    with pytest.raises(UserError, match="data.chat_template: no such file: templates/mine.jinja"):
        load("templates/mine.jinja")
    mine = tmp_path / "mine.jinja"
    mine.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert load(str(mine)).data.chat_template == str(mine)
    # a file that is not a usable template: one line naming the key, when it is used
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    tok = family_tokenizer("chatml")
    with pytest.raises(UserError) as err:
        tokenize(tok, CONVERSATION, template=chat_template_for(str(broken), tok))
    assert str(err.value).startswith(f"data.chat_template {broken}: not a usable Jinja template (line 1") and \
        "\n" not in str(err.value)


def test_a_template_of_ones_own_trains_its_answers(tmp_path):
    mine = tmp_path / "mine.jinja"
    mine.write_text("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n\n{% endfor %}")
    tok = family_tokenizer("chatml", template=False)
    done = tokenize(tok, CONVERSATION, template=chat_template_for(str(mine), tok))
    # no closing marker: the answers alone (each first token carries the space after "ASSISTANT:")
    assert trained_runs(tok, done.item) == [f" {answer}" for answer in ANSWERS]


def test_chat_template_and_prompt_templates_apply_to_their_own_formats():
    with pytest.raises(UserError, match="data.chat_template: applies to the chat formats .* format boolq"):
        render_examples([{"question": "q", "passage": "p", "answer": True}], DataSection(chat_template="chatml"))
    with pytest.raises(UserError, match="data.prompt_template: does not apply to format messages"):
        render_examples([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
                        DataSection(prompt_template="{question}"))


# --------------------------------------------------------------------------- truncation


LONG = (("system", "Be brief."),
        ("user", "What is the capital of France?"), ("assistant", "Paris."),
        ("user", "And of Italy?"), ("assistant", "Rome, of course!"),
        ("user", "And two and two?"), ("assistant", "Four."))


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_cut_prompt_leaves_out_whole_earliest_exchanges_and_keeps_the_system_message(family):
    tok = family_tokenizer(family)
    whole = tokenize(tok, LONG)
    last_two = tokenize(tok, LONG[:1] + LONG[3:])
    last = tokenize(tok, LONG[:1] + LONG[5:])
    assert whole.length > last_two.length > last.length and whole.answer == last.length
    cut = tokenize(tok, LONG, max_seq_len=last_two.length)
    assert cut.outcome == "turns_cut" and cut.item == last_two.item  # the first exchange left out, whole
    assert trained_runs(tok, cut.item) == expected_runs(family, ["Rome, of course!", "Four."])
    text = tok.decode(cut.item["input_ids"], skip_special_tokens=False)
    assert "Be brief." in text and "France" not in text
    assert cut.item["input_ids"].count(tok.bos_token_id) == 1
    assert tokenize(tok, LONG, max_seq_len=last_two.length - 1).item == last.item
    # the last exchange alone does not fit: dropped, never cut inside an answer
    dropped = tokenize(tok, LONG, max_seq_len=last.length - 1)
    assert dropped.outcome == "dropped" and dropped.item is None and dropped.answer == last.length
    assert tokenize(tok, LONG, max_seq_len=whole.length - 1, truncation="drop").outcome == "dropped"
    assert tokenize(tok, LONG, max_seq_len=whole.length, truncation="drop").outcome == "whole"


def test_the_report_counts_conversations_cut_and_dropped():
    tok = family_tokenizer("chatml")
    template = chat_template_for(None, tok)
    examples = [Example("", "", LONG), Example("", "", CONVERSATION[1:3]), Example("", "", LONG[:1] + LONG[5:])]
    limit = tokenize(tok, LONG[:1] + LONG[5:]).length
    items, report = tokenize_examples(examples, tok, limit, False, packing=False, chat_template=template)
    assert (report.whole, report.turns_cut, report.prompt_cut, report.dropped) == (2, 1, 0, 0) and len(items) == 3
    assert report.summary(limit, "cut_prompt") == (f"1 of 3 conversations without their earliest exchanges to fit "
                                                   f"data.max_seq_len {limit}")
    _, report = tokenize_examples(examples, tok, limit - 1, False, packing=False, chat_template=template)
    assert report.dropped == 2 and report.summary(limit - 1, "cut_prompt") == (
        f"2 of 3 examples dropped: the last exchange alone is longer than data.max_seq_len {limit - 1}")
    _, report = tokenize_examples(examples[:1], tok, 5, False, packing=False, chat_template=template)
    with pytest.raises(UserError, match=f"the last exchange alone .*\\(the longest last exchange: {limit} "
                                        f"tokens\\); raise data.max_seq_len to at least {limit}$"):
        check_kept(report, 5, "cut_prompt")


# --------------------------------------------------------------------------- the command and a run


def write_messages(path, n: int) -> None:
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"messages": [{"role": "system", "content": "Answer with a number."},
                                  {"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": f"{a + b}."},
                                  {"role": "user", "content": f"And {b} + {a} + 1?"},
                                  {"role": "assistant", "content": f"{a + b + 1}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_data_command_marks_the_answers_of_a_conversation(tmp_path):
    write_messages(tmp_path / "chat.jsonl", 24)
    raw = tiny_profile(tmp_path / "run", data={"dataset": str(tmp_path / "chat.jsonl"), "heldout": 4,
                                               "max_seq_len": 512})
    result = CliRunner().invoke(main, ["data", str(write_profile(tmp_path, raw)), "--examples", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "(format messages)" in out and "chatml, lowmem-tune's default chat template (the tokenizer has none)" in out
    shown = out.split("--- example 1", 1)[1]
    assert shown.count("[[") == 2 and "EOS last: no" in out
    assert "<|im_start|>assistant\n[[" in shown and ".<|im_end|>]]\n<|im_start|>user" in shown


def test_a_run_trains_on_conversations_with_its_tokenizers_chat_template(tmp_path):
    write_messages(tmp_path / "chat.jsonl", 40)
    chars = sorted({ch for line in (tmp_path / "chat.jsonl").read_text().splitlines()
                    for m in json.loads(line)["messages"] for ch in m["content"] + m["role"]})
    tok = family_tokenizer("llama3", vocab=200, corpus=["".join(chars) + " \n"] + CORPUS)
    tok.save_pretrained(tmp_path / "tokenizer")
    raw = tiny_profile(tmp_path / "run", model={"tokenizer": str(tmp_path / "tokenizer")},
                       data={"dataset": str(tmp_path / "chat.jsonl"), "heldout": 4, "max_seq_len": 64},
                       train={"max_steps": 3, "save_every": 1000, "eval_every": 1000})
    outcome = run_training(profile_from_dict(raw), resume=False, sink=Recorder())
    assert outcome.status == "completed"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    saved = (tmp_path / "run" / "final").glob("*")
    assert any(p.name in ("chat_template.jinja", "tokenizer_config.json") for p in saved)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final").chat_template == shipped_template("llama3")
