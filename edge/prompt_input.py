"""The prompt as a person gives it: an argument, or stdin when there is none (or '-')."""

from __future__ import annotations

import sys

from edge.outcome import EdgeError


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise EdgeError("no prompt: pass it as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise EdgeError("empty prompt")
    return prompt.strip()
