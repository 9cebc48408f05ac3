"""A cloud that stops talking without closing the connection (a paused process, a stuck
device, a silent network drop) is given up by the edge's client within its stall
timeouts, not after the whole takeover budget; a busy one that still answers a liveness
check is waited for. The gRPC stub is scripted: a stream that hangs until cancelled hangs
for as long as the test lets it, so every test ends on the path it asserts, not on time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from edge.cloud_client import ClientOptions, GrpcCloud
from edge.cloud_faults import CloudPace
from shared import errors
from shared.rpc import specthink_pb2 as pb
from shared.wire import (
    FINISH_LENGTH,
    FullText,
    Message,
    Sampling,
    TakeoverCall,
    TakeoverDone,
    TextChunk,
    Timings,
    Usage,
    WriteSpec,
    chunk_to_pb,
    done_to_pb,
)

CALL = TakeoverCall(
    "s1", FullText((Message("user", "hi"),), ""), Sampling(), WriteSpec(max_tokens=20)
)
DONE = TakeoverDone(FINISH_LENGTH, Usage(1, 0, 1, 2), Timings(0, 0.01, 0.02), None, 2, "0" * 64)
HANG_LIMIT_S = 30.0  # a scripted hang that nobody cancels fails the test instead of hanging it


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class ScriptedCall:
    """A server stream: sends `before`, then hangs until `release` or cancel(), then sends
    `after`. cancel() ends it as gRPC does: the reader gets CANCELLED."""

    def __init__(
        self,
        before: list[pb.TakeoverEvent],
        after: list[pb.TakeoverEvent],
        release: threading.Event | None,
    ) -> None:
        self.before, self.after = before, after
        self.release = release
        self.cancelled = threading.Event()
        self.wake = threading.Event()

    def cancel(self) -> bool:
        self.cancelled.set()
        self.wake.set()
        return True

    def __iter__(self) -> Iterator[pb.TakeoverEvent]:
        yield from self.before
        if self.release is not None:
            if self.release.is_set():
                self.wake.set()
            else:
                threading.Thread(target=self._forward, daemon=True).start()
            if not self.wake.wait(HANG_LIMIT_S):
                raise AssertionError("nobody cancelled the hanging stream")
            if self.cancelled.is_set():
                raise FakeRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        yield from self.after

    def _forward(self) -> None:
        assert self.release is not None
        if self.release.wait(HANG_LIMIT_S):
            self.wake.set()


class ScriptedStub:
    """Takeover returns the next scripted call; GetModelInfo (the liveness check) answers
    while `alive`, and each answer may release the hanging stream."""

    def __init__(self, calls: list[ScriptedCall], alive: bool = True) -> None:
        self.calls = calls
        self.alive = alive
        self.info_calls = 0
        self.release_after_checks: tuple[int, threading.Event] | None = None

    def Takeover(self, request: Any, metadata: Any = None, timeout: Any = None) -> ScriptedCall:
        return self.calls.pop(0)

    def GetModelInfo(self, request: Any, metadata: Any = None, timeout: Any = None) -> Any:
        self.info_calls += 1
        if self.release_after_checks and self.info_calls >= self.release_after_checks[0]:
            self.release_after_checks[1].set()
        if not self.alive:
            raise FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return pb.ModelInfo(model_id="scripted")


def client(stub: ScriptedStub, **options: Any) -> GrpcCloud:
    cloud = GrpcCloud(ClientOptions(address="127.0.0.1:1", **options))
    cloud.stub = stub  # type: ignore[assignment]
    cloud._connected = True
    return cloud


def chunk(text: str) -> pb.TakeoverEvent:
    return chunk_to_pb(TextChunk(text, 1))


# ---- mid-answer ------------------------------------------------------------------------


def test_a_cloud_that_goes_silent_mid_answer_is_given_up_and_not_retried() -> None:
    hang = ScriptedCall([chunk("Half"), chunk(" an")], [done_to_pb(DONE)], threading.Event())
    stub = ScriptedStub([hang])
    cloud = client(stub, stall_timeout_s=0.2, first_chunk_timeout_s=0.2, max_attempts=3)
    received: list[Any] = []
    with pytest.raises(errors.Stalled, match=r"no text for 0\.2 s"):
        for event in cloud.takeover(CALL):
            received.append(event)
    assert received == [TextChunk("Half", 1), TextChunk(" an", 1)], "what arrived is kept"
    assert hang.cancelled.is_set(), "the call was cancelled, so the cloud can stop too"
    assert (cloud.stalls, cloud.calls, cloud.retries) == (1, 1, 0)
    assert cloud.breaker.state == "open", "no more waiting on it at the next break"
    assert stub.info_calls == 0, "a cloud that was writing is not asked whether it is alive"


def test_a_cloud_that_answers_neither_the_call_nor_a_liveness_check_is_given_up() -> None:
    hang = ScriptedCall([], [done_to_pb(DONE)], threading.Event())
    stub = ScriptedStub([hang], alive=False)
    cloud = client(stub, first_chunk_timeout_s=0.1, liveness_timeout_s=0.1)
    with pytest.raises(errors.Stalled, match="no answer to a liveness check"):
        list(cloud.takeover(CALL))
    assert (stub.info_calls, cloud.alive_checks, cloud.stalls) == (1, 1, 1)
    assert hang.cancelled.is_set()
    assert cloud.breaker.state == "open"


def test_a_busy_cloud_that_answers_the_liveness_check_is_waited_for() -> None:
    """Queued behind other sessions or prefilling a long text: slow to start, not frozen."""
    release = threading.Event()
    slow = ScriptedCall([], [chunk("Late"), done_to_pb(DONE)], release)
    stub = ScriptedStub([slow], alive=True)
    stub.release_after_checks = (2, release)  # it starts writing after two checks
    cloud = client(stub, first_chunk_timeout_s=0.05)
    events = list(cloud.takeover(CALL))
    assert events == [TextChunk("Late", 1), DONE]
    assert cloud.alive_checks >= 2 and cloud.stalls == 0
    assert cloud.breaker.state == "closed"


def test_a_steady_stream_is_never_given_up() -> None:
    steady = ScriptedCall([chunk("a"), chunk("b"), done_to_pb(DONE)], [], None)
    stub = ScriptedStub([steady])
    cloud = client(stub, first_chunk_timeout_s=5.0, stall_timeout_s=5.0)
    assert [e for e in cloud.takeover(CALL)][-1] == DONE
    assert (cloud.stalls, stub.info_calls) == (0, 0)
    assert cloud.pace.samples == 1, "its timings were measured"


def test_zero_switches_the_stall_watch_off() -> None:
    release = threading.Event()
    release.set()
    call = ScriptedCall([chunk("a")], [done_to_pb(DONE)], release)
    cloud = client(ScriptedStub([call]), first_chunk_timeout_s=0, stall_timeout_s=0)
    assert cloud.first_chunk_timeout_s() == cloud.stall_timeout_s() == 0
    assert list(cloud.takeover(CALL))[-1] == DONE


# ---- sized from the cloud's measured speed ---------------------------------------------


def test_the_stall_timeouts_grow_with_the_clouds_measured_time_per_token() -> None:
    cloud = client(ScriptedStub([]), stall_timeout_s=5.0, first_chunk_timeout_s=4.0)
    assert (cloud.stall_timeout_s(), cloud.first_chunk_timeout_s()) == (5.0, 4.0)
    fast = TakeoverDone(FINISH_LENGTH, Usage(10, 0, 10, 20), Timings(0, 0.1, 1.0), None, 0, "")
    cloud.pace.observe(fast)  # 50 ms a token: 20 x 0.05 = 1 s, under the floors
    assert (cloud.stall_timeout_s(), cloud.first_chunk_timeout_s()) == (5.0, 4.0)
    slow = TakeoverDone(FINISH_LENGTH, Usage(10, 0, 10, 20), Timings(0, 0.1, 10.0), None, 0, "")
    cloud.pace.observe(slow)  # 0.5 s a token (a big model on a small GPU): 20 x 0.5 = 10 s
    assert cloud.stall_timeout_s() == pytest.approx(10.0)
    assert cloud.first_chunk_timeout_s() == pytest.approx(10.0)


def test_the_measured_pace_leans_to_the_slow_side() -> None:
    pace = CloudPace()

    def done(decode_s: float) -> TakeoverDone:
        return TakeoverDone(FINISH_LENGTH, Usage(1, 0, 1, 10), Timings(0, 0, decode_s), None, 0, "")

    pace.observe(done(1.0))
    pace.observe(done(0.1))  # one quick call shrinks it only a little
    assert pace.decode_s == pytest.approx(0.8 * 0.1 + 0.2 * 0.01)
    pace.observe(done(3.0))  # a slow one counts at once
    assert pace.decode_s == pytest.approx(0.3)


# ---- size refusals are told apart from bad requests ------------------------------------


class TrailedRpcError(FakeRpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        super().__init__(code, details)
        self._trailers = trailers

    def trailing_metadata(self) -> Any:
        return self._trailers


@pytest.mark.parametrize(
    ("details", "trailers", "expected"),
    [
        (
            "prompt does not fit",
            ((errors.ERROR_KIND_KEY, errors.TEXT_TOO_LONG),),
            errors.TextTooLong,
        ),
        ("text too long: 900 characters, limit 64", (), errors.TextTooLong),
        ("text too long for the model's context window", (), errors.TextTooLong),
        ("delta.append exceeds 400000 characters", (), errors.TextTooLong),
        ("sampling.top_p must be a number in (0, 1]", (), errors.InvalidRequest),
        ("write.preamble exceeds 512 characters", (), errors.InvalidRequest),
    ],
)
def test_a_size_refusal_is_told_apart_from_a_bad_request(
    details: str, trailers: Any, expected: type[errors.SpecThinkError]
) -> None:
    error = errors.from_rpc_error(
        TrailedRpcError(grpc.StatusCode.INVALID_ARGUMENT, details, trailers)
    )
    assert type(error) is expected


def test_a_size_refusal_carries_its_trailer_from_the_server() -> None:
    code, _, trailers = errors.to_status(errors.TextTooLong("context window is full"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (errors.ERROR_KIND_KEY, errors.TEXT_TOO_LONG) in trailers


def test_asking_a_closed_connection_what_it_serves_is_unavailable_not_a_crash() -> None:
    """A background check may ask while the answer ends and the channel is closed."""
    cloud = GrpcCloud(ClientOptions(address="127.0.0.1:1", connect_timeout_s=0.1))
    cloud._connected = True
    cloud.close()
    with pytest.raises(errors.Unavailable, match="closed"):
        cloud.model_info()
    assert cloud._alive() is False
