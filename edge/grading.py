"""Grading: the last ``\\boxed{...}`` of an output, judged against the gold answer by
``math_verify`` (never a home-made string matcher). Knows nothing of runs or files.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

GRADE_TIMEOUT_S = 5

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the ``{...}`` opening at ``text[start]``, or None when never closed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _box_content(text: str, after: int) -> str | None:
    """What a box command whose name ends at ``after`` holds, or None if not a box."""
    rest = text[after:]
    stripped = rest.lstrip(" ")
    if stripped.startswith("{"):
        return _balanced_group(text, after + len(rest) - len(stripped))
    if rest.startswith(" ") and stripped:  # "\boxed 5$": up to "$" or end of line
        return stripped.split("$")[0].split("\n")[0].strip().rstrip(".")
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the LAST complete ``\\boxed{...}`` / ``\\boxed ...`` / ``\\fbox{...}``.

    Braces are balanced, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. A box that is
    never closed (an output cut off by the token budget) is skipped in favour of the one
    before it. None when there is no complete box.
    """
    positions = sorted((i, cmd) for cmd in _BOX_COMMANDS for i in _find_all(text, cmd))
    for i, cmd in reversed(positions):
        end = i + len(cmd)
        if end < len(text) and text[end].isalpha():  # e.g. "\boxedx" is another command
            continue
        content = _box_content(text, end)
        if content is not None:
            return content.strip()
    return None


def _find_all(text: str, needle: str) -> Iterable[int]:
    i = text.find(needle)
    while i != -1:
        yield i
        i = text.find(needle, i + 1)


def _grade_timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only works on the main thread."""
    return GRADE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def grade_answer(predicted: str | None, gold: str) -> bool:
    """Whether an extracted answer equals the gold answer, as judged by math-verify."""
    if predicted is None or not predicted.strip():
        return False
    from math_verify import parse, verify

    timeout = _grade_timeout()
    parse_timeout = timeout if timeout is not None else 0
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=parse_timeout)
    pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=parse_timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def grade(output_text: str, gold: str) -> bool:
    """Whether the last box of a model output equals ``gold``. No box means wrong."""
    return grade_answer(extract_boxed(output_text), gold)
