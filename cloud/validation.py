"""Request validation: every field checked and every size bounded, before any work.

Each failure is an `InvalidRequest` whose message names the field and the limit, never
echoing the text itself (prompts are not logged or reflected back). A text over the size
limit is a `TextTooLong` (INVALID_ARGUMENT with the `x-specthink-error: text-too-long`
trailer): not a bad request, the text has outgrown the cloud, and the edge writes on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from shared import errors
from shared.wire import FullText, JudgeSpec, Message, Sampling, TextDelta, WriteSpec

SESSION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 4 << 20  # gRPC receive limit
    max_text_chars: int = 400_000  # conversation + assistant text
    max_messages: int = 256
    max_tokens_per_takeover: int = 4096
    max_stop_strings: int = 8
    max_stop_chars: int = 64
    max_preamble_chars: int = 512
    max_keywords: int = 32
    max_keyword_chars: int = 64
    max_probe_chars: int = 4096  # a judged probe (the edge drafts ~20 tokens)


def _invalid(message: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message)


def _too_long(message: str) -> errors.TextTooLong:
    return errors.TextTooLong(message)


def _check_utf8(value: str, name: str) -> None:
    # protobuf rejects invalid UTF-8 on parse; lone surrogates can still arrive from Python
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{name} is not valid UTF-8") from None


def session_id(value: str) -> str:
    if not SESSION_ID.match(value):
        raise _invalid("session_id must be 1-128 characters of [A-Za-z0-9._:-]")
    return value


def text(value: FullText | TextDelta | None, limits: Limits) -> FullText | TextDelta:
    if value is None:
        raise _invalid("one of full or delta is required")
    if isinstance(value, TextDelta):
        if not SHA256_HEX.match(value.base_sha256):
            raise _invalid("delta.base_sha256 must be 64 lower-case hex digits")
        if value.base_length > limits.max_text_chars:
            raise _too_long(f"delta.base_length exceeds {limits.max_text_chars}")
        if len(value.append) > limits.max_text_chars:
            raise _too_long(f"delta.append exceeds {limits.max_text_chars} characters")
        _check_utf8(value.append, "delta.append")
        return value
    if len(value.messages) > limits.max_messages:
        raise _invalid(f"at most {limits.max_messages} messages")
    if not value.messages:
        raise _invalid("full.messages must hold at least one message")
    total = len(value.assistant_text)
    for i, message in enumerate(value.messages):
        if message.role not in ROLES:
            raise _invalid(f"messages[{i}].role must be one of system, user, assistant")
        _check_utf8(message.content, f"messages[{i}].content")
        total += len(message.content)
    if total > limits.max_text_chars:
        raise _too_long(f"text too long: {total} characters, limit {limits.max_text_chars}")
    _check_utf8(value.assistant_text, "full.assistant_text")
    return value


def resolved_size(messages: tuple[Message, ...], assistant_text: str, limits: Limits) -> None:
    """The text a delta resolved to (held text + append) stays within the size limit."""
    total = len(assistant_text) + sum(len(m.content) for m in messages)
    if total > limits.max_text_chars:
        raise _too_long(f"text too long: {total} characters, limit {limits.max_text_chars}")


def sampling(value: Sampling) -> Sampling:
    if not math.isfinite(value.temperature) or not 0.0 <= value.temperature <= 2.0:
        raise _invalid("sampling.temperature must be a number in [0, 2]")
    if not math.isfinite(value.top_p) or not 0.0 < value.top_p <= 1.0:
        raise _invalid("sampling.top_p must be a number in (0, 1]")
    if not 0 <= value.top_k <= 1000:
        raise _invalid("sampling.top_k must be in [0, 1000]")
    return value


def _strings(values: tuple[str, ...], name: str, most: int, chars: int) -> None:
    if len(values) > most:
        raise _invalid(f"at most {most} {name}")
    for value in values:
        if not value or len(value) > chars:
            raise _invalid(f"each of {name} must be 1-{chars} characters")
        _check_utf8(value, name)


def judge(value: JudgeSpec | None, limits: Limits) -> JudgeSpec | None:
    """A judged takeover's probe and threshold (None: not judged)."""
    if value is None:
        return None
    if not 1 <= len(value.probe) <= limits.max_probe_chars:
        raise _invalid(f"judge.probe must be 1 to {limits.max_probe_chars} characters")
    _check_utf8(value.probe, "judge.probe")
    if not math.isfinite(value.accept_at) or value.accept_at > 0:
        raise _invalid("judge.accept_at_or_above must be a finite number <= 0")
    return value


def write(value: WriteSpec, limits: Limits) -> WriteSpec:
    if not 1 <= value.max_tokens <= limits.max_tokens_per_takeover:
        raise _invalid(f"write.max_tokens must be in [1, {limits.max_tokens_per_takeover}]")
    if value.continue_tokens > limits.max_tokens_per_takeover:
        raise _invalid(f"write.continue_tokens must be at most {limits.max_tokens_per_takeover}")
    if len(value.preamble) > limits.max_preamble_chars:
        raise _invalid(f"write.preamble exceeds {limits.max_preamble_chars} characters")
    _check_utf8(value.preamble, "write.preamble")
    _strings(value.stop, "write.stop", limits.max_stop_strings, limits.max_stop_chars)
    _strings(
        value.continue_if,
        "write.continue_if_contains",
        limits.max_keywords,
        limits.max_keyword_chars,
    )
    return value
