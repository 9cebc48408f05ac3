"""The edge's gRPC client of the cloud: one streaming call per takeover, retries with
backoff, and a circuit breaker. Implements `edge.session.CloudTransport`.

Failures come out as the shared error tree (`shared.errors`), never as grpc.RpcError, so
the session loop decides what to do by name: FAILED_PRECONDITION is resent with the full
text by `CloudSession`, retryable errors are retried here before any text arrived, and
what still fails is written locally by the loop.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from shared import errors
from shared.rpc import specthink_pb2 as pb
from shared.rpc import specthink_pb2_grpc as rpc
from shared.wire import (
    FullText,
    TakeoverCall,
    TakeoverDone,
    TextChunk,
    TextDelta,
    call_to_pb,
    event_from_pb,
    prefill_to_pb,
)

SESSION_HEADER = "x-session-id"


@dataclass(frozen=True)
class ClientOptions:
    address: str
    api_key: str | None = None
    connect_timeout_s: float = 3.0
    takeover_timeout_s: float = 30.0
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_attempts: int = 3
    max_backoff_s: float = 2.0
    breaker_failures: int = 3
    breaker_cooldown_s: float = 15.0


def _channel(options: ClientOptions) -> grpc.Channel:
    channel_options = [("grpc.max_receive_message_length", 4 << 20), ("grpc.enable_retries", 0)]
    if not options.tls:
        return grpc.insecure_channel(options.address, options=channel_options)
    root = Path(options.tls_ca_file).read_bytes() if options.tls_ca_file else None
    cert = Path(options.tls_cert_file).read_bytes() if options.tls_cert_file else None
    key = Path(options.tls_key_file).read_bytes() if options.tls_key_file else None
    credentials = grpc.ssl_channel_credentials(root, key, cert)
    return grpc.secure_channel(options.address, credentials, options=channel_options)


class CircuitBreaker:
    """Closed -> (N failures in a row) -> open for a cooldown -> half-open: one probe call.
    A success closes it; a failed probe opens it again. No flapping: while open, calls
    fail at once without touching the network."""

    def __init__(
        self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ):
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self._opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        with self._lock:
            state = self.state
            if state == "closed":
                return True
            if state == "half-open" and not self._probing:
                self._probing = True
                return True
            return False

    def record(self, ok: bool) -> None:
        with self._lock:
            self._probing = False
            if ok:
                self._consecutive, self._opened_at = 0, None
                return
            self._consecutive += 1
            if self._opened_at is not None or self._consecutive >= self.failures:
                self._opened_at = self.clock()


class GrpcCloud:
    """CloudTransport over a gRPC channel."""

    def __init__(self, options: ClientOptions, sleep: Callable[[float], None] = time.sleep):
        self.options = options
        self.sleep = sleep
        self.channel = _channel(options)
        self.stub = rpc.SpecThinkStub(self.channel)
        self.breaker = CircuitBreaker(options.breaker_failures, options.breaker_cooldown_s)
        self._connected = False
        self.retries = 0
        self._active: grpc.Future | None = None

    def close(self) -> None:
        self.cancel_active()
        self.channel.close()

    def cancel_active(self) -> None:
        """Cancel the call in flight (Ctrl-C): the server sees CANCELLED and stops."""
        call = self._active
        if call is not None:
            call.cancel()

    def _metadata(self, session_id: str | None = None) -> list[tuple[str, str]]:
        metadata = []
        if self.options.api_key:
            metadata.append(("authorization", f"Bearer {self.options.api_key}"))
        if session_id:
            metadata.append((SESSION_HEADER, session_id))
        return metadata

    def _connect(self) -> None:
        if self._connected:
            return
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.options.connect_timeout_s)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(
                f"cannot reach the cloud at {self.options.address} "
                f"(no connection within {self.options.connect_timeout_s:g} s)"
            ) from None
        self._connected = True

    def model_info(self) -> pb.ModelInfo:
        self._connect()
        try:
            return self.stub.GetModelInfo(
                pb.ModelInfoRequest(),
                metadata=self._metadata(),
                timeout=self.options.connect_timeout_s + 5,
            )
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None

    def end_session(self, session_id: str) -> None:
        with contextlib.suppress(grpc.RpcError):  # best effort: idle sessions expire anyway
            self.stub.EndSession(
                pb.EndSessionRequest(session_id=session_id),
                metadata=self._metadata(session_id),
                timeout=2.0,
            )

    def prefill(self, session_id: str, text: FullText | TextDelta) -> tuple[int, str]:
        """Warm the cloud's cache for the session; no retries (it is only an optimisation)."""
        if not self.breaker.allow():
            raise errors.Unavailable("cloud circuit open")
        try:
            self._connect()
            reply = self.stub.Prefill(
                prefill_to_pb(session_id, text),
                metadata=self._metadata(session_id),
                timeout=self.options.takeover_timeout_s,
            )
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None
        return reply.committed_length, reply.committed_sha256

    def takeover(self, call: TakeoverCall) -> Iterator[TextChunk | TakeoverDone]:
        """One takeover, retried with backoff while nothing has arrived yet."""
        attempt = 0
        while True:
            attempt += 1
            if not self.breaker.allow():
                raise errors.Unavailable(
                    "cloud circuit open after repeated failures; writing locally until it recovers"
                )
            received = False
            try:
                self._connect()
                for event in self._stream(call):
                    received = True
                    yield event
                self.breaker.record(ok=True)
                return
            except errors.SpecThinkError as exc:
                transient = exc.retryable or isinstance(exc, errors.Unavailable)
                self.breaker.record(ok=not transient)
                if received or not transient or attempt >= self.options.max_attempts:
                    raise
                self.retries += 1
                self._connected = False
                self.sleep(self._backoff(attempt, exc))

    def _backoff(self, attempt: int, exc: errors.SpecThinkError) -> float:
        if isinstance(exc, errors.Overloaded):
            return min(exc.retry_after_s, self.options.max_backoff_s)
        return min(self.options.max_backoff_s, 0.1 * 2**attempt) * random.uniform(0.5, 1.0)

    def _stream(self, call: TakeoverCall) -> Iterator[TextChunk | TakeoverDone]:
        responses = self.stub.Takeover(
            call_to_pb(call),
            metadata=self._metadata(call.session_id),
            timeout=self.options.takeover_timeout_s,
        )
        self._active = responses
        try:
            for event in responses:
                yield event_from_pb(event)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None
        finally:
            self._active = None
            responses.cancel()  # no-op when finished; stops the server when abandoned
