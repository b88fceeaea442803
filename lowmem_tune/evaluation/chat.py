"""Evaluation contexts rendered with the tokenizer's chat template, as lm-evaluation-harness 0.4.13
does with `--apply_chat_template`.

A context is a list of turns: the card's preamble as a system message, each few-shot example as a
user turn (its prompt) and an assistant turn (its answer), and the question as a last user turn.
Without a chat template the turns are joined as plain text, each followed by its delimiter
(the target delimiter after a prompt, the few-shot delimiter after an answer). With one they are
rendered by `tokenizer.apply_chat_template(..., add_generation_prompt=True)`: as separate turns
(`fewshot_as_multiturn`, the harness's default with a chat template) or with the examples and the
question joined, as plain text, into one user turn. A template that refuses the system message
(a jinja2 TemplateError) renders again without it, as the harness does; the protocol counts those.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lowmem_tune.errors import UserError, one_line


@dataclass
class Turn:
    role: str  # system, user or assistant
    content: str
    delimiter: str = ""  # what follows it in plain text


def plain_text(turns: list[Turn]) -> str:
    return "".join(t.content + t.delimiter for t in turns)


def chat_template_of(tokenizer: PreTrainedTokenizerBase, key: str = "--apply-chat-template") -> str:
    """The tokenizer's chat template (the default of named ones); a one-line UserError when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise UserError(f"{key}: the tokenizer has no chat template (a base model's usually has none); "
                        "evaluate without it, or with a model whose tokenizer carries one (a run trained on "
                        "chat data saves its template with final/)")
    return template


class ChatRenderer:
    """Turns -> the text the tokenizer's chat template makes of them, generation prompt added."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, multiturn: bool, key: str = "--apply-chat-template"):
        self.tokenizer = tokenizer
        self.template = chat_template_of(tokenizer, key)
        self.multiturn = multiturn
        self.key = key
        self.system_dropped = 0  # contexts rendered again without their system message

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()

    def messages(self, turns: list[Turn]) -> list[dict[str, str]]:
        system = [{"role": t.role, "content": t.content} for t in turns if t.role == "system"]
        rest = [t for t in turns if t.role != "system"]
        if self.multiturn:
            return system + [{"role": t.role, "content": t.content} for t in rest]
        # One user turn: the examples and the question as plain text (the question's delimiter dropped).
        return system + [{"role": "user", "content": plain_text(rest[:-1]) + rest[-1].content}]

    def _apply(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)

    def render(self, turns: list[Turn]) -> str:
        import jinja2

        messages = self.messages(turns)
        try:
            try:
                return self._apply(messages)
            except jinja2.TemplateError:
                without = [m for m in messages if m["role"] != "system"]
                if len(without) == len(messages):
                    raise
                text = self._apply(without)
                self.system_dropped += 1
                return text
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            roles = ", ".join(m["role"] for m in messages)
            raise UserError(f"{self.key}: the tokenizer's chat template could not render a context "
                            f"of roles {roles} ({one_line(err, 160)})") from None
