"""The prompt as a person gives it: an argument, or stdin when there is none (or '-').

Text that is not valid UTF-8 (a Latin-1 file piped in, such bytes in an argument: Python
hands those on as lone surrogates) goes on with each bad byte replaced by U+FFFD, and one
notice says so: the models and the wire take valid UTF-8 only.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from edge.outcome import EdgeError

_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(given: str | bytes) -> tuple[str, int]:
    """`given` as valid text, and how many of its bytes were not UTF-8 (each now U+FFFD).
    A str is what Python made of bytes: undecodable ones are lone surrogates in it."""
    if isinstance(given, str):
        if not _SURROGATE.search(given):
            return given, 0
        try:
            data = given.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that stands for no byte (from a wide API)
            data = given.encode("utf-8", "surrogatepass")
    else:
        data = given
    escaped = data.decode("utf-8", "surrogateescape")  # one surrogate per bad byte
    return _SURROGATE.subn("\ufffd", escaped)


def say_replaced(what: str, replaced: int, say: Callable[[str], None]) -> None:
    if replaced:
        count = "1 byte" if replaced == 1 else f"{replaced} bytes"
        say(f"{what} was not valid UTF-8: {count} replaced with U+FFFD")


def read_prompt(prompt: str | None, say: Callable[[str], None]) -> str:
    """The prompt, stripped: the argument, or all of stdin (read as bytes, so that no
    locale's decoding can fail on them)."""
    given: str | bytes
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise EdgeError("no prompt: pass it as an argument or pipe it on stdin")
        stream = getattr(sys.stdin, "buffer", None)
        given = stream.read() if stream is not None else sys.stdin.read()
    else:
        given = prompt
    text, replaced = valid_text(given)
    if not text.strip():
        raise EdgeError("empty prompt")
    say_replaced("the prompt", replaced, say)
    return text.strip()


def read_line(interactive: bool) -> tuple[str | None, int]:
    """The next line a person types (None at the end of input), and how many of its bytes
    were not UTF-8. Ctrl-C and Ctrl-D are the caller's."""
    if interactive:
        try:
            return valid_text(input("> "))
        except UnicodeDecodeError as exc:  # a strict locale: the line's bytes are in it
            return valid_text(bytes(exc.object).rstrip(b"\r\n"))
    stream = getattr(sys.stdin, "buffer", None)
    line = stream.readline() if stream is not None else sys.stdin.readline()
    return valid_text(line) if line else (None, 0)
