"""The edge's gRPC client of the cloud: one streaming call per takeover, retries with
backoff, and a circuit breaker. Implements `edge.cloud_session.CloudTransport`.

Failures come out as the shared error tree (`shared.errors`), never as grpc.RpcError, so
the session loop decides what to do by name: FAILED_PRECONDITION is resent with the full
text by `CloudSession`, retryable errors are retried here before any text arrived, and
what still fails is written locally by the loop.

Clocks that bound the wait on a cloud:

- the connect timeout: reaching it at all (a few seconds);
- the takeover budget, for a whole takeover, every attempt, backoff and connect of it:
  the takeover timeout plus `per_token_timeout_s` for each token it may write; a takeover
  that runs out of it ends in DEADLINE_EXCEEDED (or UNAVAILABLE);
- the stall watch (`StallWatch`), for a cloud that stops talking without closing the
  connection (a paused process, a stuck device, a silent network drop): once it writes,
  a gap of more than the stall timeout between chunks cancels the call; before its first
  chunk, after the first-chunk timeout a liveness check (GetModelInfo) asks whether it is
  there at all: one that answers is queueing or prefilling and is waited for (within the
  budget), one that does not is given up. Both timeouts are floors that grow with the
  cloud's measured time per token (`CloudPace`). A stall ends in `errors.Stalled`, is not
  retried, and opens the circuit breaker at once.

Whatever fails, the loop writes the stretch locally.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from edge.cloud_faults import CircuitBreaker, CloudPace, StallWatch
from edge.config_values import split_cloud_address
from edge.reachability import BackgroundCheck, Reachability
from shared import errors
from shared.rpc import specthink_pb2 as pb
from shared.rpc import specthink_pb2_grpc as rpc
from shared.wire import (
    FullText,
    JudgeVerdict,
    TakeoverCall,
    TakeoverDone,
    TextChunk,
    TextDelta,
    call_to_pb,
    event_from_pb,
    prefill_to_pb,
)

if TYPE_CHECKING:
    from edge.config import EffectiveConfig

SESSION_HEADER = "x-session-id"


@dataclass(frozen=True)
class ClientOptions:
    address: str
    api_key: str | None = None
    connect_timeout_s: float = 3.0
    takeover_timeout_s: float = 30.0
    # ... plus this much per token the takeover may write: a 225-token verification
    # continuation on a slow cloud must not be cut off by a budget sized for 20 tokens
    per_token_timeout_s: float = 0.5
    # a cloud that stops talking is noticed by these (seconds; 0 = off), not by the budget:
    # no first chunk for first_chunk_timeout_s and no answer to a liveness check within
    # liveness_timeout_s, or no chunk for stall_timeout_s once it writes. Both grow to
    # stall_factor x the cloud's measured seconds per token when that is longer.
    first_chunk_timeout_s: float = 5.0
    stall_timeout_s: float = 5.0
    stall_factor: float = 20.0
    liveness_timeout_s: float = 3.0
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_attempts: int = 3
    max_backoff_s: float = 2.0
    breaker_failures: int = 3
    breaker_cooldown_s: float = 15.0

    @classmethod
    def from_config(cls, cfg: EffectiveConfig) -> ClientOptions:
        """The client's options from the edge's settings."""
        address, tls = split_cloud_address(cfg.cloud or "")
        return cls(
            address=address,
            api_key=cfg.api_key,
            connect_timeout_s=cfg.connect_timeout_s,
            takeover_timeout_s=cfg.takeover_timeout_s,
            first_chunk_timeout_s=cfg.first_chunk_timeout_s,
            stall_timeout_s=cfg.stall_timeout_s,
            tls=bool(tls or cfg.tls or cfg.tls_ca_file),
            tls_ca_file=Path(cfg.tls_ca_file) if cfg.tls_ca_file else None,
            tls_cert_file=Path(cfg.tls_cert_file) if cfg.tls_cert_file else None,
            tls_key_file=Path(cfg.tls_key_file) if cfg.tls_key_file else None,
        )


def _channel(options: ClientOptions) -> grpc.Channel:
    channel_options = [
        ("grpc.max_receive_message_length", 4 << 20),
        ("grpc.enable_retries", 0),  # retries are ours: they honour the server's hint
        # a cloud that comes back (restart, redeploy) is found again within a second or two
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if not options.tls:
        return grpc.insecure_channel(options.address, options=channel_options)
    root = Path(options.tls_ca_file).read_bytes() if options.tls_ca_file else None
    cert = Path(options.tls_cert_file).read_bytes() if options.tls_cert_file else None
    key = Path(options.tls_key_file).read_bytes() if options.tls_key_file else None
    credentials = grpc.ssl_channel_credentials(root, key, cert)
    return grpc.secure_channel(options.address, credentials, options=channel_options)


class GrpcCloud:
    """CloudTransport over a gRPC channel.

    `check_reachability`: the cloud is checked in the background from the start
    (edge.reachability, while the small model loads); an unusable one is said once through
    `notify`. The first takeover waits for the check, never the first token; a cloud found
    unusable fails every takeover at once (`NeverReached`)."""

    def __init__(
        self,
        options: ClientOptions,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        notify: Callable[[str], None] | None = None,
        check_reachability: bool = False,
    ):
        self.options = options
        self.notify = notify or (lambda message: None)  # retries and resends, for stderr
        self.sleep = sleep
        self.clock = clock
        self.channel = _channel(options)
        self.stub = rpc.SpecThinkStub(self.channel)
        self.breaker = CircuitBreaker(
            options.breaker_failures, options.breaker_cooldown_s, clock=clock
        )
        self._connected = False
        self.retries = 0  # attempts made again after a transient failure
        self.calls = 0  # takeover attempts that went out on the network
        self.stalls = 0  # calls given up because the cloud stopped talking
        self.alive_checks = 0  # liveness checks made while waiting for a first chunk
        self.pace = CloudPace()
        self._active: grpc.Future | None = None
        # why the background check found the cloud unusable: takeovers fail at once
        self._unreachable: str | None = None
        self._awaiting_check = check_reachability
        self.check: BackgroundCheck | None = None
        if check_reachability:
            self.check = BackgroundCheck(
                self.model_info, options.address, options.connect_timeout_s, self._checked
            )

    def _checked(self, found: Reachability) -> None:
        """What the background check found: an unusable cloud is said once, here, and
        fails every takeover at once (no retries). A refused key is said by the takeover
        that meets it (exit 3), or at the end."""
        if not found.reachable and not found.key_refused:
            self._unreachable = found.why
            self.notify(
                f"cloud {self.options.address} unusable: {found.why}; writing on this machine only"
            )

    @property
    def unusable(self) -> Reachability | None:
        """The check's finding when it found the cloud unusable (so far), else None."""
        found = self.check.peek() if self.check is not None else None
        return found if found is not None and not found.reachable else None

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

    def _connect(self, budget_s: float | None = None) -> None:
        if self._connected:
            return
        wait = self.options.connect_timeout_s
        if budget_s is not None:
            wait = max(0.0, min(wait, budget_s))
        try:
            grpc.channel_ready_future(self.channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(
                f"cannot reach the cloud at {self.options.address}: no connection within {wait:g} s"
            ) from None
        self._connected = True

    def model_info(self) -> pb.ModelInfo:
        """What the cloud serves. Safe from another thread (a background check) even while
        the channel is being closed: that is UNAVAILABLE, not a crash."""
        try:
            self._connect()
            return self.stub.GetModelInfo(
                pb.ModelInfoRequest(),
                metadata=self._metadata(),
                timeout=self.options.connect_timeout_s + 5,
            )
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None
        except ValueError as exc:  # grpc: "Cannot invoke RPC on closed channel!"
            raise errors.Unavailable(f"the connection to the cloud is closed ({exc})") from None

    def end_session(self, session_id: str) -> None:
        if not self.breaker.closed or not self._connected:
            return  # best effort: idle sessions expire anyway; never wait on a dead cloud
        with contextlib.suppress(grpc.RpcError):
            self.stub.EndSession(
                pb.EndSessionRequest(session_id=session_id),
                metadata=self._metadata(session_id),
                timeout=2.0,
            )

    def prefill(self, session_id: str, text: FullText | TextDelta) -> tuple[int, str]:
        """Warm the cloud's cache for the session; no retries (it is only an optimisation),
        and never while the breaker is open or probing (takeovers probe, not this)."""
        if not self.breaker.closed:
            raise errors.Unavailable("cloud circuit open")
        try:
            self._connect()
            reply = self.stub.Prefill(
                prefill_to_pb(session_id, text),
                metadata=self._metadata(session_id),
                timeout=self.options.takeover_timeout_s,
            )
        except grpc.RpcError as exc:
            error = errors.from_rpc_error(exc)
            if _transient(error):
                self._connected = False
                self.breaker.record(ok=False)
            raise error from None
        except errors.SpecThinkError:
            self.breaker.record(ok=False)
            raise
        self.breaker.record(ok=True)
        return reply.committed_length, reply.committed_sha256

    def takeover(self, call: TakeoverCall) -> Iterator[TextChunk | JudgeVerdict | TakeoverDone]:
        """One takeover, retried with backoff while nothing has arrived yet, all within
        one takeover budget."""
        if self._awaiting_check and self.check is not None:  # no race with the check
            self._awaiting_check = False
            self.check.wait(self.options.connect_timeout_s + 10)
        if self._unreachable is not None:
            raise errors.NeverReached(f"cloud unreachable: {self._unreachable}")
        budget_s = self.takeover_budget_s(call)
        deadline = self.clock() + budget_s
        attempt = 0
        while True:
            attempt += 1
            if not self.breaker.allow():
                raise errors.Unavailable(
                    "cloud circuit open after repeated failures; writing locally until it recovers"
                )
            received = False
            recorded = False
            try:
                self._connect(budget_s=deadline - self.clock())
                left = deadline - self.clock()
                if left <= 0:
                    raise errors.DeadlineExceeded(
                        f"no answer within the takeover timeout ({budget_s:g} s)"
                    )
                self.calls += 1
                for event in self._stream(call, left):
                    if not received:  # the cloud is answering: it is alive
                        received = recorded = True
                        self.breaker.record(ok=True)
                    yield event
                if not recorded:
                    recorded = True
                    self.breaker.record(ok=True)
                return
            except errors.Stalled:
                # it froze: no retry (it would freeze again), and no more calls until the
                # breaker's cooldown has passed; the loop writes locally meanwhile
                recorded = True
                self.breaker.trip()
                raise
            except errors.SpecThinkError as exc:
                transient = _transient(exc)
                if not recorded:
                    recorded = True
                    self.breaker.record(ok=not transient)
                if transient:
                    self._connected = False
                if isinstance(exc, errors.BaseMismatch):
                    self.notify(
                        "the cloud no longer holds this answer (restarted or evicted); "
                        "sending the full text again"
                    )
                if received or not transient or attempt >= self.options.max_attempts:
                    raise
                pause = self._backoff(attempt, exc)
                if self.clock() + pause >= deadline:
                    raise  # no time left for another attempt: the loop writes locally
                self.retries += 1
                self.notify(
                    f"cloud {type(exc).__name__} ({exc.message}); "
                    f"retry {attempt}/{self.options.max_attempts - 1} in {pause:.1f} s"
                )
                self.sleep(pause)
            finally:
                if not recorded:  # abandoned (Ctrl-C, or the consumer stopped reading)
                    self.breaker.release()

    def takeover_budget_s(self, call: TakeoverCall) -> float:
        """The takeover timeout plus an allowance per token the call may write."""
        tokens = call.write.max_tokens + call.write.continue_tokens
        return self.options.takeover_timeout_s + tokens * self.options.per_token_timeout_s

    def first_chunk_timeout_s(self) -> float:
        """How long without a first chunk before asking whether the cloud is there."""
        return self._sized(self.options.first_chunk_timeout_s)

    def stall_timeout_s(self) -> float:
        """The longest gap between chunks of a cloud that is writing."""
        return self._sized(self.options.stall_timeout_s)

    def _sized(self, floor_s: float) -> float:
        if floor_s <= 0:
            return 0.0
        return max(floor_s, self.options.stall_factor * self.pace.decode_s)

    def _alive(self) -> bool:
        """Does the cloud answer at all? Anything but silence until the deadline counts
        (a refusal is an answer too)."""
        try:
            self.stub.GetModelInfo(
                pb.ModelInfoRequest(),
                metadata=self._metadata(),
                timeout=self.options.liveness_timeout_s,
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return code != grpc.StatusCode.DEADLINE_EXCEEDED
        except ValueError:  # the channel was closed under the watch (Ctrl-C, exit)
            return False
        return True

    def _backoff(self, attempt: int, exc: errors.SpecThinkError) -> float:
        if isinstance(exc, errors.Overloaded):  # the server said when to come back
            return min(exc.retry_after_s, self.options.max_backoff_s)
        return min(self.options.max_backoff_s, 0.1 * 2**attempt) * random.uniform(0.5, 1.0)

    def _stream(
        self, call: TakeoverCall, timeout_s: float
    ) -> Iterator[TextChunk | JudgeVerdict | TakeoverDone]:
        responses = self.stub.Takeover(
            call_to_pb(call),
            metadata=self._metadata(call.session_id),
            timeout=timeout_s,
        )
        self._active = responses
        watch = StallWatch(
            responses.cancel, self.first_chunk_timeout_s(), self.stall_timeout_s(), self._alive
        )
        try:
            with watch:
                for message in responses:
                    watch.heard()
                    event = event_from_pb(message)
                    if isinstance(event, TakeoverDone):
                        self.pace.observe(event)
                    yield event
        except grpc.RpcError as exc:
            if watch.why is not None:
                self.stalls += 1
                raise errors.Stalled(f"the cloud stopped answering: {watch.why}") from None
            raise _explained(errors.from_rpc_error(exc), self.options) from None
        finally:
            self.alive_checks += watch.alive_checks
            self._active = None
            responses.cancel()  # no-op when finished; stops the server when abandoned


def _transient(exc: errors.SpecThinkError) -> bool:
    """Worth another attempt (and a mark against the cloud's health)."""
    return exc.retryable or isinstance(exc, errors.Unavailable)


def _explained(exc: errors.SpecThinkError, options: ClientOptions) -> errors.SpecThinkError:
    """gRPC's own words for a deadline are terse: say which timeout it was."""
    if isinstance(exc, errors.DeadlineExceeded):
        return errors.DeadlineExceeded(
            f"no complete answer within the takeover timeout ({options.takeover_timeout_s:g} s "
            f"+ {options.per_token_timeout_s:g} s per token; SPECTHINK_TAKEOVER_TIMEOUT)"
        )
    return exc
