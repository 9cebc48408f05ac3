"""The error tree both sides share, and its one mapping to and from gRPC status codes.

    SpecThinkError
     ├── InvalidRequest       INVALID_ARGUMENT    bad field, out of range
     │    └── TextTooLong     INVALID_ARGUMENT    the text no longer fits the cloud (its context
     │                                            window or its text limit): the edge writes on
     ├── Unauthenticated      UNAUTHENTICATED     missing or wrong API key
     ├── SessionNotFound      NOT_FOUND           no such session (for this key)
     ├── BaseMismatch         FAILED_PRECONDITION a delta's base is not what the cloud holds
     ├── Overloaded           RESOURCE_EXHAUSTED  admission queue full (retry_after_s hint)
     ├── Unavailable          UNAVAILABLE         loading, draining, unreachable
     │    └── NeverReached    (client side only)  a check found the address unusable (refused,
     │                                            unresolvable) before the first takeover
     ├── Cancelled            CANCELLED           the caller went away
     ├── DeadlineExceeded     DEADLINE_EXCEEDED   the caller's deadline passed
     ├── InternalError        INTERNAL            a bug or a device failure; never a prompt
     └── Stalled              (client side only)  the cloud stopped talking mid-call: no first
                                                  chunk and no answer to a liveness check, or
                                                  no chunk for the stall timeout

Servers raise these; `to_status` turns one into a status code and message in exactly one
place. Clients turn a `grpc.RpcError` back into the same class with `from_rpc_error`, so
code on both sides speaks in these names, not in status codes. `TextTooLong` shares
INVALID_ARGUMENT with its parent and is told apart by the `x-specthink-error: text-too-long`
trailer (and, from servers that predate it, by the wording of their size messages).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import grpc

RETRY_AFTER_KEY = "retry-after-ms"
ERROR_KIND_KEY = "x-specthink-error"  # trailer naming a subclass that shares its status code
TEXT_TOO_LONG = "text-too-long"
# how size refusals were worded before the trailer existed (cloud/validation.py, servicer)
_SIZE_WORDING = re.compile(r"too long|context window|delta\.(append|base_length) exceeds")


class SpecThinkError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SpecThinkError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class TextTooLong(InvalidRequest):
    """The text no longer fits what the cloud can take: its context window is full, or the
    text is over its size limit. Not a bad request: the edge writes on alone."""


class Unauthenticated(SpecThinkError):
    code = grpc.StatusCode.UNAUTHENTICATED


class SessionNotFound(SpecThinkError):
    code = grpc.StatusCode.NOT_FOUND


class BaseMismatch(SpecThinkError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(SpecThinkError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(SpecThinkError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class NeverReached(Unavailable):
    """The client's own check found the cloud unusable before any takeover (the edge said
    so when the check found it); not retried."""

    retryable = False


class Cancelled(SpecThinkError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(SpecThinkError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class InternalError(SpecThinkError):
    code = grpc.StatusCode.INTERNAL


class Stalled(SpecThinkError):
    """Raised by the edge's client, never sent by a server: the cloud stopped talking in the
    middle of a call (a paused process, a stuck device, a silent network drop). Not worth
    retrying at once: the loop writes locally and the circuit breaker opens."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[SpecThinkError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        Unauthenticated,
        SessionNotFound,
        BaseMismatch,
        Overloaded,
        Unavailable,
        Cancelled,
        DeadlineExceeded,
        InternalError,
    )
}
_BY_CODE[grpc.StatusCode.PERMISSION_DENIED] = Unauthenticated
_BY_CODE[grpc.StatusCode.OUT_OF_RANGE] = InvalidRequest


def to_status(error: SpecThinkError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Status code, message and trailing metadata for an error raised by the server."""
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(error, Overloaded):
        trailers = ((RETRY_AFTER_KEY, str(int(error.retry_after_s * 1000))),)
    elif isinstance(error, TextTooLong):
        trailers = ((ERROR_KIND_KEY, TEXT_TOO_LONG),)
    return error.code, error.message, trailers


def _trailers(error: grpc.RpcError) -> tuple[tuple[str, Any], ...]:
    trailers: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return tuple(trailers or ())


def from_rpc_error(error: grpc.RpcError) -> SpecThinkError:
    """The shared error for a failed call, as the client sees it."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(code)
    cls = _BY_CODE.get(code, Unavailable if code == grpc.StatusCode.UNKNOWN else InternalError)
    if cls is Overloaded:
        retry_ms = 1000.0
        for key, value in _trailers(error):
            if key == RETRY_AFTER_KEY:
                with contextlib.suppress(ValueError):
                    retry_ms = float(value)
        return Overloaded(details, retry_after_s=retry_ms / 1000.0)
    if cls is InvalidRequest and (
        (ERROR_KIND_KEY, TEXT_TOO_LONG) in _trailers(error) or _SIZE_WORDING.search(details)
    ):
        return TextTooLong(details)
    return cls(details)
