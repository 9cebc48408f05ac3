"""One RPC's bookkeeping, apart from what it does: its request id, its JSON log lines, and
the one place where the shared error tree (`shared.errors`) becomes a gRPC status. No torch.

Logs are one JSON object per line with the request id (the caller's `x-request-id`
metadata when it sends a sane one, else a fresh one; echoed back in the initial metadata),
the session id and the caller's key id (never the key); the servicer adds what it may log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from cloud.metrics import Metrics
from shared import errors

_log = logging.getLogger("specthink.cloud")
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")


@dataclass(frozen=True)
class Malformed:
    """A request protobuf refused to parse (see cloud.server's tolerant deserializers)."""

    reason: str


@dataclass
class CallLog:
    """Who asked what, for the JSON log lines of one RPC."""

    rpc: str
    request_id: str
    started: float
    fields: dict[str, Any] = field(default_factory=dict)


def request_id(context: grpc.ServicerContext) -> str:
    """The caller's `x-request-id` when it sends a sane one, else a fresh id."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex[:16]


def parsed(request: Any) -> Any:
    """The request, or INVALID_ARGUMENT for one that did not parse."""
    if isinstance(request, Malformed):
        raise errors.InvalidRequest(request.reason)
    return request


class RpcCalls:
    """Begin, log and end the RPCs of one servicer (`cloud.servicer`)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.clock = clock

    def begin(self, rpc_name: str, context: grpc.ServicerContext) -> CallLog:
        call = CallLog(rpc_name, request_id(context), self.clock())
        with contextlib.suppress(Exception):  # the call may be gone: the id is a courtesy
            context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
        return call

    def log(self, call: CallLog, event: str, **fields: Any) -> None:
        record = {
            "event": event,
            "rpc": call.rpc,
            "request_id": call.request_id,
            **call.fields,
            **fields,
        }
        _log.info(json.dumps(record, ensure_ascii=False))

    def abort(
        self,
        context: grpc.ServicerContext,
        error: errors.SpecThinkError,
        call: CallLog | None = None,
    ) -> None:
        code, message, trailers = errors.to_status(error)
        self.metrics.inc("errors", code=code.name)
        if call is not None:
            self.log(
                call,
                "error",
                code=code.name,
                message=message,
                total_s=round(self.clock() - call.started, 4),
            )
        if trailers:
            context.set_trailing_metadata(trailers)
        context.abort(code, message)

    def guard(self, context: grpc.ServicerContext, call: CallLog, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except errors.SpecThinkError as exc:
            self.abort(context, exc, call)
        except Exception:
            _log.exception("internal error in %s (request %s)", call.rpc, call.request_id)
            self.abort(context, errors.InternalError("internal error"), call)
