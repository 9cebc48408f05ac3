"""How a conversation becomes a prompt for a model that has no chat template.

Each side renders the conversation with its own model's chat template; a model without
one (a base model such as Gemma-3-270M) gets this plain completion prompt instead, the
same on both sides. The assistant's text is appended verbatim after it.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.wire import Message

ROLES = ("system", "user", "assistant")


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
