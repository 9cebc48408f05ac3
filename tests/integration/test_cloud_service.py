"""The cloud under concurrency, cancellation and supersede, on a real gRPC server on
127.0.0.1 with a scripted engine (tests.integration.cloud_harness).

No wall-clock bounds: each test asserts which path ran (the engine's recorded events,
the server's counters), so a loaded machine makes them slower, never red."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from shared.errors import RETRY_AFTER_KEY
from shared.wire import text_digest
from tests.integration.cloud_harness import (
    ScriptedEngine,
    collect,
    delta_request,
    full_request,
    running_server,
    stub,
)

pytestmark = pytest.mark.timeout(60)


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


class Background:
    """Consume a streaming call in a thread; keeps the text, the done and the error."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.text = ""
        self.done: Any = None
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.text, self.done = collect(self.call)
        except grpc.RpcError as exc:
            self.error = exc

    def join(self, timeout: float = 10.0) -> Background:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "call did not finish"
        return self


def test_full_queue_refuses_at_once_with_retry_hint() -> None:
    gate = threading.Event()
    engine = ScriptedEngine(gate=gate)
    with running_server(engine, max_waiting=1) as server:
        _, api = stub(server.address)
        running = Background(api.Takeover(full_request("a")))
        wait_for(lambda: server.admission.running == 1, what="a running")
        queued = Background(api.Takeover(full_request("b")))
        wait_for(lambda: server.admission.waiting == 1, what="b queued")
        # answered while the gate is shut, so it cannot have waited for a place
        with pytest.raises(grpc.RpcError) as refused:
            collect(api.Takeover(full_request("c")))
        assert not gate.is_set() and server.admission.waiting == 1
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(refused.value.trailing_metadata())
        assert 50 <= int(trailers[RETRY_AFTER_KEY]) <= 30_000
        gate.set()
        assert running.join().done is not None
        assert queued.join().done is not None


def test_queue_is_fifo_so_no_session_starves() -> None:
    gate = threading.Event()
    engine = ScriptedEngine(gate=gate)
    with running_server(engine, max_waiting=8) as server:
        _, api = stub(server.address)
        calls = [Background(api.Takeover(full_request("first", max_tokens=1)))]
        wait_for(lambda: server.admission.running == 1, what="first running")
        order = [f"q{i}" for i in range(6)]
        for i, name in enumerate(order):
            calls.append(Background(api.Takeover(full_request(name, max_tokens=1))))
            wait_for(lambda i=i: server.admission.waiting == i + 1, what=f"{name} queued")
        gate.set()
        for call in calls:
            assert call.join().done is not None
        started = [e.session.split("/", 1)[1] for e in engine.of("start")]
        assert started == ["first", *order]


def test_cancel_during_prefill_stops_between_chunks() -> None:
    # chunks 0-2 run; chunk 3 of 200 never gets its turn, so only the cancel can end it
    engine = ScriptedEngine(prefill_chunks=200, prefill_gate=threading.Event(), prefill_gate_from=3)
    with running_server(engine) as server:
        _, api = stub(server.address)
        call = api.Takeover(full_request("p"))
        wait_for(lambda: len(engine.of("prefill")) == 3, what="prefill under way")
        call.cancel()
        stopped = wait_for(lambda: engine.of("stopped"), what="engine stopped")[0]
        assert stopped.detail == ("prefill", 3)
        assert len(engine.of("prefill")) == 3 and not engine.of("token")
        wait_for(lambda: server.admission.running == 0, what="slot released")
        engine.prefill_chunks = 0
        _text, done = collect(api.Takeover(full_request("next", max_tokens=2)))
        assert done.usage.generated_tokens == 2


def test_cancel_during_decode_stops_within_one_step() -> None:
    # tokens 0-2 are written; token 3 never gets its turn, so only the cancel can end it
    engine = ScriptedEngine(gate=threading.Event(), gate_from=3)
    with running_server(engine) as server:
        _, api = stub(server.address)
        call = api.Takeover(full_request("d", max_tokens=200))
        for _ in range(3):
            next(call)
        call.cancel()
        # seen by should_stop() at the held step, or by the server closing the stream
        wait_for(lambda: engine.of("stopped") + engine.of("closed"), what="engine stop")
        assert engine.stopped == [("anonymous/d", 3)]
        assert len(engine.of("token")) == 3 and not engine.of("done")
        wait_for(lambda: server.admission.running == 0, what="slot released")


def test_client_deadline_is_honoured_and_nothing_committed() -> None:
    engine = ScriptedEngine(gate=threading.Event(), gate_from=2)  # only the deadline ends it
    with running_server(engine) as server:
        _, api = stub(server.address)
        with pytest.raises(grpc.RpcError) as late:
            collect(api.Takeover(full_request("late", max_tokens=200), timeout=2.0))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: engine.of("stopped") + engine.of("closed"), what="engine stop")
        assert engine.stopped and not engine.of("done")
        with pytest.raises(grpc.RpcError) as base:
            collect(api.Takeover(delta_request("late", "", "x")))
        assert base.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_second_call_supersedes_the_first_without_interleaving() -> None:
    engine = ScriptedEngine(token_delay_s=0.03)
    with running_server(engine) as server:
        _, api = stub(server.address)
        first = api.Takeover(full_request("s", "one:", max_tokens=200))
        partial = next(first).chunk.text + next(first).chunk.text
        text2, done2 = collect(api.Takeover(full_request("s", "two:", max_tokens=3)))
        with pytest.raises(grpc.RpcError) as superseded:
            collect(first)
        assert superseded.value.code() == grpc.StatusCode.CANCELLED
        assert "superseded" in (superseded.value.details() or "")
        # the engine ran them one after the other: the first stopped before the second began
        first_end = (engine.of("stopped", "anonymous/s") + engine.of("closed", "anonymous/s"))[0]
        second_start = engine.of("start", "anonymous/s")[1]
        assert first_end.at <= second_start.at
        assert (done2.committed_length, done2.committed_sha256) == text_digest("two:" + text2)
        # the first's text was never committed
        with pytest.raises(grpc.RpcError) as stale:
            collect(api.Takeover(delta_request("s", "one:" + partial, "")))
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        collect(api.Takeover(delta_request("s", "two:" + text2, " more")))


def test_only_delivered_text_is_committed_when_the_stream_breaks() -> None:
    engine = ScriptedEngine(token_delay_s=0.03)
    with running_server(engine) as server:
        _, api = stub(server.address)
        text1, done1 = collect(api.Takeover(full_request("c", "Base.", max_tokens=3)))
        base = "Base." + text1
        assert done1.committed_length == len(base)
        broken = api.Takeover(delta_request("c", base, " more", max_tokens=200))
        partial = next(broken).chunk.text + next(broken).chunk.text
        broken.cancel()
        wait_for(lambda: server.admission.running == 0, what="slot released")
        with pytest.raises(grpc.RpcError) as refused:
            collect(api.Takeover(delta_request("c", base + " more" + partial, "")))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        text3, done3 = collect(api.Takeover(delta_request("c", base, " again", max_tokens=2)))
        assert (done3.committed_length, done3.committed_sha256) == text_digest(
            base + " again" + text3
        )


def test_many_concurrent_sessions_all_finish() -> None:
    engine = ScriptedEngine(token_delay_s=0.002)
    with running_server(engine, max_waiting=32) as server:
        _, api = stub(server.address)
        calls = [Background(api.Takeover(full_request(f"m{i}", max_tokens=4))) for i in range(16)]
        for call in calls:
            call.join()
            assert call.error is None and call.done.usage.generated_tokens == 4
        assert server.admission.running == 0 and server.admission.waiting == 0
