"""What one takeover promises on the wire (docs/api.md), on a real gRPC server on
127.0.0.1 with a scripted engine: the verification continuation in the same call, a
full context as a normal end, and the commit window (a final message lost after the
commit must not strand the caller's base)."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from cloud.engine_api import EngineContextFull
from cloud.validation import Limits
from shared import errors
from shared.rpc import specthink_pb2 as pb
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
CHECK = ["check", "verify"]


def _events(call: Any) -> list[pb.TakeoverEvent]:
    return list(call)


# ---- verification continuation ---------------------------------------------------------


def test_keyword_after_a_length_finish_writes_continue_tokens_more_in_the_same_call() -> None:
    engine = ScriptedEngine(scripts=[["Let", " me", " Check", " it"], ["A", "B", "C"]])
    with running_server(engine) as server:
        _, api = stub(server.address)
        request = full_request(
            "v", "So x=2.", max_tokens=4, continue_if_contains=CHECK, continue_tokens=3
        )
        events = _events(api.Takeover(request))
    chunks = [e.chunk for e in events[:-1]]
    done = events[-1].done
    assert [c.text for c in chunks] == ["Let", " me", " Check", " it", "A", "B", "C"]
    assert done.continued and done.continued_on == "check"
    assert done.finish_reason == pb.FINISH_REASON_LENGTH
    assert done.usage.generated_tokens == 4 + 3 == sum(c.tokens for c in chunks)
    # two engine calls, the second continuing the first's text, for continue_tokens
    first, second = engine.calls
    assert (first.max_tokens, second.max_tokens) == (4, 3)
    assert second.assistant_text == "So x=2.Let me Check it"
    # one commit: the whole text, once
    assert (done.committed_length, done.committed_sha256) == text_digest(
        "So x=2.Let me Check itABC"
    )
    assert len(engine.of("done")) == 2


def test_keyword_in_a_stretch_that_ended_early_does_not_continue() -> None:
    # the model ended its answer (end of sequence) right after "check": nothing more
    engine = ScriptedEngine(tokens=("I", " check", "."), end_after=3)
    with running_server(engine) as server:
        _, api = stub(server.address)
        request = full_request("e", max_tokens=10, continue_if_contains=CHECK, continue_tokens=5)
        text, done = collect(api.Takeover(request))
    assert text == "I check."
    assert not done.continued and done.continued_on == ""
    assert done.finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE
    assert len(engine.calls) == 1


def test_no_keyword_or_no_continue_tokens_means_one_engine_call() -> None:
    engine = ScriptedEngine(tokens=("All", " good", "."))
    with running_server(engine) as server:
        _, api = stub(server.address)
        _, done = collect(
            api.Takeover(
                full_request("n", max_tokens=3, continue_if_contains=CHECK, continue_tokens=5)
            )
        )
        assert not done.continued
        engine.tokens = ("check",)
        _, done2 = collect(api.Takeover(full_request("z", max_tokens=2)))
        assert not done2.continued
    assert len(engine.calls) == 2


def test_recap_preamble_is_streamed_first_committed_and_not_a_keyword_itself() -> None:
    recap = "Let me check whether there are some wrong steps:"
    engine = ScriptedEngine(tokens=(" Step", " one", " is", " fine"))
    with running_server(engine) as server:
        _, api = stub(server.address)
        request = full_request(
            "r", "x=2.\n\n", max_tokens=4, preamble=recap, continue_if_contains=CHECK
        )
        request.write.continue_tokens = 6
        events = _events(api.Takeover(request))
    first = events[0].chunk
    done = events[-1].done
    assert (first.text, first.tokens) == (recap, 0)
    # the engine continued the text with the preamble already in it
    assert engine.calls[0].assistant_text == "x=2.\n\n" + recap
    # "check" in the preamble is the cloud's own text, not the model's: no continuation
    assert not done.continued and len(engine.calls) == 1
    written = "".join(e.chunk.text for e in events[:-1])
    assert (done.committed_length, done.committed_sha256) == text_digest("x=2.\n\n" + written)


# ---- a full context is a normal end ----------------------------------------------------


def test_text_over_the_context_window_ends_normally_with_context_full() -> None:
    engine = ScriptedEngine(refuse=[EngineContextFull("prompt is 5000 tokens; window 4096")])
    with running_server(engine) as server:
        _, api = stub(server.address)
        events = _events(api.Takeover(full_request("f", "Long text.", max_tokens=8)))
        done = events[-1].done
        assert len(events) == 1  # no chunk: nothing was written
        assert done.finish_reason == pb.FINISH_REASON_CONTEXT_FULL
        assert done.usage.generated_tokens == 0
        # the session holds the text: the caller can go on with deltas
        assert (done.committed_length, done.committed_sha256) == text_digest("Long text.")
        text, again = collect(api.Takeover(delta_request("f", "Long text.", " More")))
        assert again.finish_reason == pb.FINISH_REASON_LENGTH and text


def test_context_full_during_the_continuation_keeps_the_first_stretch() -> None:
    engine = ScriptedEngine(
        tokens=("check", "!"), refuse=[None, EngineContextFull("no room for more")]
    )
    with running_server(engine) as server:
        _, api = stub(server.address)
        request = full_request("g", max_tokens=2, continue_if_contains=CHECK, continue_tokens=9)
        text, done = collect(api.Takeover(request))
    assert text == "check!"
    assert done.continued_on == "check"
    assert done.finish_reason == pb.FINISH_REASON_CONTEXT_FULL
    assert done.usage.generated_tokens == 2
    assert (done.committed_length, done.committed_sha256) == text_digest("check!")


def test_text_over_the_size_limit_is_text_too_long_not_a_bad_request() -> None:
    with running_server(ScriptedEngine(), limits=Limits(max_text_chars=60)) as server:
        _, api = stub(server.address)
        refusals = []
        with pytest.raises(grpc.RpcError) as full:
            collect(api.Takeover(full_request("t", "x" * 60)))
        refusals.append(full.value)
        text, _ = collect(api.Takeover(full_request("t", "y" * 20, max_tokens=2)))
        # a delta within its own bounds whose resolved text outgrows the limit
        with pytest.raises(grpc.RpcError) as grown:
            collect(api.Takeover(delta_request("t", "y" * 20 + text, "z" * 40)))
        refusals.append(grown.value)
    for refusal in refusals:
        assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("x-specthink-error", "text-too-long") in tuple(refusal.trailing_metadata())
        assert isinstance(errors.from_rpc_error(refusal), errors.TextTooLong)


# ---- the commit window -----------------------------------------------------------------


class BreakAfterCommit:
    """The next commit cancels the armed call from the client side right after it: the
    session holds the new text, and the caller never receives the final message."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.real_commit = server.sessions.commit
        self.call: Any = None
        self.armed = threading.Event()
        self.committed = threading.Event()
        server.sessions.commit = self._commit

    def arm(self, call: Any) -> Any:
        self.call = call
        self.armed.set()
        return call

    def _commit(self, *args: Any, **kwargs: Any) -> bool:
        ok: bool = self.real_commit(*args, **kwargs)
        assert self.armed.wait(10)
        self.call.cancel()
        self.server.sessions.commit = self.real_commit
        self.committed.set()
        return ok


def test_delta_against_the_old_base_works_when_done_is_lost_after_the_commit() -> None:
    engine = ScriptedEngine(tokens=("a", "b", "c"))
    with running_server(engine) as server:
        _, api = stub(server.address)
        text1, _ = collect(api.Takeover(full_request("w", "Base.", max_tokens=3)))
        base = "Base." + text1
        window = BreakAfterCommit(server)
        call = window.arm(api.Takeover(delta_request("w", base, " more", max_tokens=3)))
        with pytest.raises(grpc.RpcError) as broken:
            collect(call)
        assert broken.value.code() == grpc.StatusCode.CANCELLED
        assert window.committed.is_set()  # the break fell in the window: after the commit
        # the caller still holds `base` (it never heard of the commit): a delta against it
        text3, done3 = collect(api.Takeover(delta_request("w", base, " again", max_tokens=2)))
        assert (done3.committed_length, done3.committed_sha256) == text_digest(
            base + " again" + text3
        )


def test_delta_against_the_new_text_also_works_after_a_lost_done() -> None:
    engine = ScriptedEngine(tokens=("a", "b", "c"))
    with running_server(engine) as server:
        _, api = stub(server.address)
        collect(api.Takeover(full_request("n", "Base.", max_tokens=1)))
        base = "Base.a"
        window = BreakAfterCommit(server)
        call = window.arm(api.Takeover(delta_request("n", base, " more", max_tokens=2)))
        with pytest.raises(grpc.RpcError):
            collect(call)
        assert window.committed.is_set()
        # a caller that did receive every chunk may name the committed text instead
        _, done = collect(api.Takeover(delta_request("n", base + " moreab", "!", max_tokens=1)))
        assert (done.committed_length, done.committed_sha256) == text_digest(base + " moreab!a")
