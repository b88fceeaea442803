"""Conversations (formats messages and sharegpt): records read as messages, the chat template that
renders them, and where in the rendered text each assistant answer and its end-of-turn marker lie.

The loss spans are found from the rendered text alone, never from a template's `{% generation %}`
markers: each assistant turn is rendered once more with a placeholder for its content, which shows
what the template writes before the answer (the turn's header) and after it (its closing marker:
`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, ...); the span is the answer as rendered plus
that marker, without the whitespace that follows it. Tokenization maps the character spans to
tokens (tokenize.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lowmem_tune.errors import UserError, one_line
from lowmem_tune.resources import chat_template_names, chat_templates_dir

CHAT_FORMATS = ("messages", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
"""ShareGPT's `from` values and the roles they are (the messages names are taken too)."""
DEFAULT_TEMPLATE = "chatml"

Message = tuple[str, str]
"""(role, content): role one of ROLES."""

_ANSWER = "\ue000lowmem-tune answer\ue001"
"""Stands for an assistant's content when a turn is rendered to see what surrounds the answer
(private-use characters, which no template changes and no data holds)."""


# --------------------------------------------------------------------------- records


def conversation(record: dict[str, Any], fmt: str, index: int) -> tuple[Message, ...]:
    """The record's messages as (role, content); sharegpt's human / gpt become user / assistant.

    A system message may only come first (sharegpt's `system` field, where a record has one,
    becomes it); messages after the last assistant message are left out (nothing trains on them).
    A record that breaks these rules is a one-line UserError naming it."""
    field, role_key, content_key = ("messages", "role", "content") if fmt == "messages" else (
        "conversations", "from", "value")
    where = f"data.dataset: record {index} (format {fmt})"
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: {field} must be a non-empty list of {{{role_key}, {content_key}}} messages")
    names = ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
    messages: list[Message] = []
    system = record.get("system") if fmt == "sharegpt" else None
    if isinstance(system, str) and system.strip():
        messages.append(("system", system))
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: {field}[{j}] is not a mapping of {role_key} and {content_key}")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in names:
            raise UserError(f"{where}: {field}[{j}].{role_key} is {_short(role)}; it must be one of {', '.join(names)}")
        if not isinstance(content, str):
            raise UserError(f"{where}: {field}[{j}].{content_key} must be text, not {_short(content)}")
        role = SHAREGPT_ROLES[role] if fmt == "sharegpt" else role
        if role == "system" and messages:
            raise UserError(f"{where}: {field}[{j}] is a system message after the first message; a system "
                            "message may only come first")
        messages.append((role, content))
    last = max((j for j, (role, _) in enumerate(messages) if role == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where}: no assistant message, so nothing to train on")
    return tuple(messages[: last + 1])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def exchange_starts(messages: tuple[Message, ...]) -> list[int]:
    """Where each exchange begins: the first message after any system message, and every user
    message that follows a message of another role. Truncation drops whole exchanges, earliest
    first, keeping the system message."""
    first = 1 if messages[0][0] == "system" else 0
    return [i for i in range(first, len(messages))
            if i == first or (messages[i][0] == "user" and messages[i - 1][0] != "user")]


def without_earliest(messages: tuple[Message, ...], start: int) -> tuple[Message, ...]:
    """The system message (if any) and the messages from `start` on."""
    return (messages[:1] if messages[0][0] == "system" else ()) + messages[start:]


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    """The Jinja text."""
    origin: str
    """Where it comes from, in words (errors and `lowmem-tune data` name it)."""


def shipped_template(name: str) -> str:
    return (chat_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")


def chat_template_for(setting: str | None, tokenizer: Any) -> ChatTemplate:
    """`data.chat_template` (a shipped name or a Jinja file; the profile checked it names one), else
    the tokenizer's own chat template, else the shipped default, chatml."""
    if setting is not None:
        return read_chat_template(setting)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates: the default one
        own = own.get("default")
    if isinstance(own, str) and own.strip():
        return ChatTemplate(own, "the tokenizer's chat template")
    return ChatTemplate(shipped_template(DEFAULT_TEMPLATE),
                        f"{DEFAULT_TEMPLATE}, lowmem-tune's default chat template (the tokenizer has none)")


def read_chat_template(setting: str) -> ChatTemplate:
    if setting in chat_template_names():
        return ChatTemplate(shipped_template(setting), f"data.chat_template {setting}")
    shown = setting if setting.isprintable() and len(setting) <= 80 else repr(setting)[:80] + "…"
    try:
        text = Path(setting).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data.chat_template: {shown} is not UTF-8 text; give a Jinja template file") from None
    except (OSError, RuntimeError) as err:
        raise UserError(f"data.chat_template: cannot read {shown} ({getattr(err, 'strerror', None) or one_line(err)})"
                        ) from None
    if not text.strip():
        raise UserError(f"data.chat_template: {shown} is empty; give a Jinja chat template")
    return ChatTemplate(text, f"data.chat_template {shown}")


# --------------------------------------------------------------------------- rendering


Render = Callable[[tuple[Message, ...]], str]


def renderer(tokenizer: Any, template: ChatTemplate) -> Render:
    """Messages -> the text `template` makes of them, through the tokenizer's `apply_chat_template`
    (no generation prompt). A template that fails is a one-line UserError naming it."""
    import jinja2

    def render(messages: tuple[Message, ...]) -> str:
        if not messages:
            return ""
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            text = tokenizer.apply_chat_template(conversation, chat_template=template.source, tokenize=False,
                                                 add_generation_prompt=False)
        except jinja2.TemplateSyntaxError as err:
            raise UserError(f"{template.origin}: not a usable Jinja template (line {err.lineno}: {one_line(err, 160)})"
                            f"{_hint(template.origin)}") from None
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                RecursionError, OverflowError) as err:
            roles = ", ".join(role for role, _ in messages)
            raise UserError(f"{template.origin}: could not render a conversation of roles {roles} "
                            f"({one_line(err, 160)}){_hint(template.origin)}") from None
        if not isinstance(text, str):
            raise UserError(f"{template.origin}: rendering gave no text{_hint(template.origin)}")
        return text

    return render


def _hint(origin: str) -> str:
    """How to get past a template that fails, for the template `origin` names."""
    names = ", ".join(chat_template_names())
    if origin.startswith("data.chat_template"):
        return f"; fix the template or choose a shipped one ({names})"
    return f"; set data.chat_template to a shipped template ({names}) or a Jinja file"


def corpus_renderer(template: ChatTemplate) -> Render:
    """Renders with `template` without the run's tokenizer (which is then still to be trained on
    these texts, for a random-init model): a stub tokenizer named like the local one (<s>, </s>)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    stub = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return renderer(stub, template)


def answer_spans(render: Render, messages: tuple[Message, ...], origin: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, for each assistant message, the characters [start, end) of
    its content as rendered and the marker that closes the turn (trailing whitespace excluded).

    For a template that renders every beginning of a conversation as the beginning of the whole
    (the common case), the positions come straight from the turn's own rendering; for one that does
    not (it renders a last turn differently), the answer and its marker are looked up in the whole
    text after the turn's start. `origin` names the template in errors."""
    text = render(messages)
    spans: list[tuple[int, int]] = []
    floor = 0
    for i, (role, content) in enumerate(messages):
        if role != "assistant":
            continue
        before = render(messages[:i])
        if text.startswith(before):
            floor = max(floor, len(before))
        marked = render(messages[:i] + (("assistant", _ANSWER),))
        at = marked.find(_ANSWER)
        if at < 0 or marked.find(_ANSWER, at + 1) >= 0:
            raise UserError(f"{origin}: it does not write an assistant message's content once, as given, so the "
                            f"answer (the tokens trained on) cannot be found{_hint(origin)}")
        head, tail = marked[:at], marked[at + len(_ANSWER):]
        closing = tail.rstrip()
        upto = render(messages[: i + 1])
        fits = len(upto) >= len(head) + len(tail) and upto.startswith(head) and upto.endswith(tail)
        answer = upto[len(head): len(upto) - len(tail)] if fits else content
        if fits and text.startswith(upto) and len(head) >= floor:
            start = len(head)
        else:
            start = text.find(answer + closing, floor)
            if start < 0:
                raise UserError(f"{origin}: the rendered conversation does not hold assistant message {i}'s "
                                f"content followed by the turn's closing {closing!r}{_hint(origin)}")
        spans.append((start, start + len(answer) + len(closing)))
        floor = spans[-1][1]
    return text, spans
