"""`lowmem-tune data`: a look at a profile's data before training — the records rendered, the
tokenizer and the tokenized items exactly as a run makes them (`train.setup.tokenize_data`, the one
path both take), without a model: lengths against data.max_seq_len, what truncation cuts or drops,
the share of tokens the loss is computed on, and a few examples with their trained spans marked."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from lowmem_tune.errors import UserError
from lowmem_tune.profile import Profile, load_profile

OPEN, CLOSE = "[[", "]]"
"""Around trained spans when the output is not a terminal."""
TRAINED_STYLE = "bold green"


def data_command(profile: Path, overrides: tuple[str, ...], examples: int, as_json: bool) -> None:
    if examples < 0:
        raise UserError(f"--examples {examples}: give 0 or more examples to show")
    notes: list[str] = []
    loaded = load_profile(profile, overrides, notes)
    for note in notes:
        click.echo(note, err=True)
    facts = data_facts(loaded, examples)
    if as_json:
        print(json.dumps(facts, indent=2, ensure_ascii=False))
    elif sys.stdout.isatty():
        _print_rich(facts)
    else:
        print(render_plain(facts))


def data_facts(profile: Profile, examples: int = 2) -> dict[str, Any]:
    """What `data` shows, as one JSON-ready dictionary."""
    from lowmem_tune.catalog import resolve_model
    from lowmem_tune.data.tokenize import check_kept, tokenize_example
    from lowmem_tune.modeling import quiet_library_progress
    from lowmem_tune.train.setup import tokenize_data

    quiet_library_progress()
    resolved = resolve_model(profile.model.name, profile.model.revision)
    # main=False: a tokenizer trained for a random-init model stays in memory (the run saves it)
    data = tokenize_data(profile, resolved, Path(profile.output.dir), main=False)
    d = profile.data
    train, heldout = data.train_report, data.heldout_report
    try:
        check_kept(train, d.max_seq_len, d.truncation)
        stop = None
    except UserError as err:  # what the run would stop with: shown with the facts that explain it
        stop = str(err)
    samples = []
    for example in data.train_examples[:examples]:
        done = tokenize_example(example, data.tokenizer, d.max_seq_len, d.train_on_prompt, data.bos, d.truncation,
                                data.chat_template)
        shown = done.item
        if shown is None:  # dropped: the whole example, to see why
            shown = tokenize_example(example, data.tokenizer, done.length, d.train_on_prompt, data.bos,
                                     chat_template=data.chat_template).item
        samples.append({"outcome": done.outcome, "length": done.length, "tokens": len(shown["input_ids"]),
                        "spans": _spans(data.tokenizer, shown)})
    return {
        "dataset": data.dataset,
        "format": data.format,
        "examples": {"total": len(data.train_examples) + len(data.heldout_examples),
                     "train": len(data.train_examples), "heldout": len(data.heldout_examples)},
        "tokenizer": {"source": data.tokenizer_source, "size": len(data.tokenizer), "bos_first": data.bos,
                      "eos_last": data.tokenizer.eos_token_id is not None and data.chat_template is None},
        "chat_template": data.chat_template.origin if data.chat_template else None,
        "max_seq_len": d.max_seq_len,
        "truncation": d.truncation,
        "train_on_prompt": d.train_on_prompt,
        "packing": d.packing,
        "lengths": train.percentiles(),
        "over_max_seq_len": sum(n > d.max_seq_len for n in train.lengths),
        "train": {**train.to_dict(), "sequences": len(data.train_items)},
        "heldout": {**heldout.to_dict(), "sequences": len(data.heldout_items)},
        "note": data.truncation_note(d),
        "run_error": stop,
        "samples": samples,
    }


def _spans(tokenizer, item: dict[str, list[int]]) -> list[dict[str, Any]]:
    """The item's text as runs of trained and untrained tokens. A token is trained when the loss
    predicts it: its label is a target and it is not the first (nothing precedes it)."""
    from lowmem_tune.data import IGNORE_INDEX

    trained = [i > 0 and label != IGNORE_INDEX for i, label in enumerate(item["labels"])]
    spans: list[dict[str, Any]] = []
    start = 0
    for end in range(1, len(trained) + 1):
        if end == len(trained) or trained[end] != trained[start]:
            text = tokenizer.decode(item["input_ids"][start:end], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            spans.append({"text": text, "trained": trained[start]})
            start = end
    return spans


_OUTCOME_WORDS = {"whole": "whole", "prompt_cut": "prompt cut from the left", "text_cut": "cut at data.max_seq_len",
                  "turns_cut": "earliest exchanges left out", "dropped": "dropped (shown whole)"}


def _summary_lines(facts: dict[str, Any]) -> list[tuple[str, str]]:
    ex, tok, train, held = facts["examples"], facts["tokenizer"], facts["train"], facts["heldout"]
    limit = f"data.max_seq_len {facts['max_seq_len']}"
    lines = [
        ("dataset", f"{facts['dataset']} (format {facts['format']})"),
        ("examples", f"{ex['total']:,}: {ex['train']:,} train, {ex['heldout']:,} held-out"),
        ("tokenizer", f"{tok['source']}; {tok['size']:,} tokens; BOS first: {'yes' if tok['bos_first'] else 'no'}, "
                      f"EOS last: {'yes' if tok['eos_last'] else 'no'}"),
    ]
    if facts["chat_template"]:
        lines.append(("chat", f"rendered by {facts['chat_template']}; the loss is on each assistant answer and the "
                              "marker that closes its turn"))
    p = facts["lengths"]
    if p:
        lines.append(("lengths", f"tokens per training example p50 {p['p50']:,}, p90 {p['p90']:,}, p99 {p['p99']:,}, "
                                 f"max {p['max']:,} against {limit}: {facts['over_max_seq_len']:,} longer"))
    for name, report in (("train", train), ("held-out", held)):
        if not report["examples"]:
            continue
        if report["whole"] == report["examples"]:
            text = f"all {report['examples']:,} fit whole"
        else:
            parts = [f"{report['whole']:,} whole"]
            if report["prompt_cut"]:
                parts.append(f"{report['prompt_cut']:,} prompts cut from the left")
            if report["turns_cut"]:
                parts.append(f"{report['turns_cut']:,} without their earliest exchanges")
            if report["text_cut"]:
                parts.append(f"{report['text_cut']:,} texts cut at the end")
            if report["dropped"]:
                alone = "the last exchange alone" if facts["chat_template"] else "the answer alone"
                why = "longer than data.max_seq_len" if facts["truncation"] == "drop" else f"{alone} is longer"
                parts.append(f"{report['dropped']:,} dropped ({why})")
            text = f"of {report['examples']:,}: " + ", ".join(parts)
        lines.append((name, f"{text} (data.truncation {facts['truncation']})"))
    if facts["run_error"]:
        lines.append(("a run", f"would stop: {facts['run_error']}"))
    on_prompt = "true: prompts too" if facts["train_on_prompt"] else "false: answers only"
    lines.append(("loss", f"{train['loss_share']:.1%} of the {train['tokens']:,} training tokens carry loss "
                          f"(data.train_on_prompt {on_prompt})"))
    if facts["packing"]:
        lines.append(("packing", f"{train['kept']:,} training examples in {train['sequences']:,} sequences of up "
                                 f"to {facts['max_seq_len']} tokens"))
    return lines


def _sample_title(i: int, sample: dict[str, Any]) -> str:
    cut = "" if sample["tokens"] == sample["length"] else f" of {sample['length']:,}"
    return f"example {i + 1}: {sample['tokens']:,}{cut} tokens, {_OUTCOME_WORDS[sample['outcome']]}"


def render_plain(facts: dict[str, Any]) -> str:
    """The report as plain text, trained spans between [[ and ]] (for pipes and files)."""
    width = max(len(k) for k, _ in _summary_lines(facts))
    out = [f"{k:<{width}}  {v}" for k, v in _summary_lines(facts)]
    if facts["samples"]:
        out.append(f"\ntrained tokens (the loss is computed on them) between {OPEN} and {CLOSE}")
    for i, sample in enumerate(facts["samples"]):
        out.append(f"\n--- {_sample_title(i, sample)}")
        out.append("".join(f"{OPEN}{s['text']}{CLOSE}" if s["trained"] else s["text"] for s in sample["spans"]))
    return "\n".join(out)


def _print_rich(facts: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in _summary_lines(facts):
        table.add_row(key, Text(value))
    console.print(table)
    if facts["samples"]:
        console.print(Text.assemble("\ntrained tokens (the loss is computed on them) in ",
                                    ("this colour", TRAINED_STYLE)))
    for i, sample in enumerate(facts["samples"]):
        console.print(Text(f"\n{_sample_title(i, sample)}", style="bold"))
        console.print(Text.assemble(*((s["text"], TRAINED_STYLE if s["trained"] else "dim") for s in sample["spans"])))
