"""The error tree both sides share, and its one mapping to and from gRPC status codes.

    SpecThinkError
     ├── InvalidRequest       INVALID_ARGUMENT    bad field, out of range, too long
     ├── Unauthenticated      UNAUTHENTICATED     missing or wrong API key
     ├── SessionNotFound      NOT_FOUND           no such session (for this key)
     ├── BaseMismatch         FAILED_PRECONDITION a delta's base is not what the cloud holds
     ├── Overloaded           RESOURCE_EXHAUSTED  admission queue full (retry_after_s hint)
     ├── Unavailable          UNAVAILABLE         loading, draining, unreachable
     ├── Cancelled            CANCELLED           the caller went away
     ├── DeadlineExceeded     DEADLINE_EXCEEDED   the caller's deadline passed
     └── InternalError        INTERNAL            a bug or a device failure; never a prompt

Servers raise these; `to_status` turns one into a status code and message in exactly one
place. Clients turn a `grpc.RpcError` back into the same class with `from_rpc_error`, so
code on both sides speaks in these names, not in status codes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import grpc

RETRY_AFTER_KEY = "retry-after-ms"


class SpecThinkError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SpecThinkError):
    code = grpc.StatusCode.INVALID_ARGUMENT


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


class Cancelled(SpecThinkError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(SpecThinkError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class InternalError(SpecThinkError):
    code = grpc.StatusCode.INTERNAL


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
    return error.code, error.message, trailers


def from_rpc_error(error: grpc.RpcError) -> SpecThinkError:
    """The shared error for a failed call, as the client sees it."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(code)
    cls = _BY_CODE.get(code, Unavailable if code == grpc.StatusCode.UNKNOWN else InternalError)
    if cls is Overloaded:
        retry_ms = 1000.0
        trailers: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == RETRY_AFTER_KEY:
                with contextlib.suppress(ValueError):
                    retry_ms = float(value)
        return Overloaded(details, retry_after_s=retry_ms / 1000.0)
    return cls(details)
