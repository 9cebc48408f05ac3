"""How a conversation and the assistant's text become one prompt, the same way on both sides.

Each side renders the conversation with its own model's chat template; a model without
one (a base model such as Gemma-3-270M) gets `plain_prompt` instead, the same on both
sides. The assistant's text is then joined on with `join_prompt`.

The think block of reasoning models is decided once, on the wire: for a reasoning model
the assistant text itself starts with `THINK_OPEN` ("<think>\\n"; the edge writes it, see
`think_prefix`). Chat templates disagree on it: some revisions of DeepSeek-R1-Distill's
append "<think>\\n" to the generation prompt and some do not, and the edge (llama.cpp's
Jinja) and the cloud (transformers) may hold different revisions. So `join_prompt` drops
a think opener that a template put at the end of the generation prompt and lets the text
say whether the answer is inside the block: every template variant, on either side, gives
the model the same prompt, with exactly one "<think>".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from shared.wire import Message

ROLES = ("system", "user", "assistant")
THINK_OPEN = "<think>\n"
# a think opener a chat template appended to the generation prompt (with its newline)
_TRAILING_THINK = re.compile(r"<think>[ \t]*\n?\Z")


def plain_prompt(messages: Sequence[Message]) -> str:
    """System text, then each turn as "User: ..." / "Assistant: ...", then "Assistant: "."""
    parts: list[str] = []
    for message in messages:
        if message.role == "system":
            parts.append(message.content.strip())
        else:
            parts.append(f"{message.role.capitalize()}: {message.content.strip()}")
    parts.append("Assistant: ")
    return "\n\n".join(parts)


def template_thinks(chat_template: str | None) -> bool:
    """Whether a chat template is a reasoning model's (it knows a <think> block)."""
    return bool(chat_template) and "think>" in str(chat_template)


def think_prefix(chat_template: str | None) -> str:
    """What the assistant text of a model with this template starts with on the wire:
    `THINK_OPEN` for a reasoning model, else nothing."""
    return THINK_OPEN if template_thinks(chat_template) else ""


def join_prompt(rendered: str, assistant_text: str) -> str:
    """The rendered generation prompt continued by the assistant text.

    A think opener at the end of `rendered` (a template revision that appends it) is
    dropped: whether the answer is inside a think block is the text's to say, so a text
    that starts with "<think>\\n" gets exactly one, and one that does not gets none."""
    return _TRAILING_THINK.sub("", rendered) + assistant_text
