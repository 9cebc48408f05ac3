"""Property tests: random and malformed requests thrown at the servicer's methods, called
directly with a fake ServicerContext that records the abort status.

Whatever arrives, the servicer answers with a proper status (never INTERNAL or UNKNOWN,
never an uncaught exception), never lets one API key's text reach another key's session,
and a successful takeover always confirms exactly the text the caller now holds.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.admission import Admission, AdmissionLimits
from cloud.auth import ApiKeys, key_id
from cloud.rpc_calls import Malformed
from cloud.servicer import SpecThinkServicer
from cloud.sessions import SessionStore
from cloud.validation import Limits
from shared.rpc import specthink_pb2 as pb
from shared.wire import text_digest
from tests.integration.cloud_harness import ScriptedEngine

KEYS = ["alpha-key-0123456789", "bravo-key-0123456789"]
MARK = {k: f"<<secret-of-{k[:5]}>>" for k in KEYS}
PROPER = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class FakeContext:
    """The part of grpc.ServicerContext the servicer uses."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata
        self.trailers: Any = ()

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def send_initial_metadata(self, metadata: Any) -> None:
        pass

    def set_trailing_metadata(self, trailers: Any) -> None:
        self.trailers = trailers

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float | None:
        return None


class World:
    """One servicer, and what each (key, session) should hold by the protocol."""

    def __init__(self) -> None:
        self.engine = ScriptedEngine(tokens=("a", "b", " c", "\n"))
        self.servicer = SpecThinkServicer(
            self.engine,
            admission=Admission(AdmissionLimits(max_waiting=4)),
            sessions=SessionStore(max_sessions=64),
            limits=Limits(max_tokens_per_takeover=32, max_text_chars=2000),
            api_keys=ApiKeys(KEYS),
        )
        self.held: dict[tuple[str, str], str] = {}


# ---- strategies -----------------------------------------------------------------------

text = st.text(max_size=40)
session_ids = st.one_of(st.sampled_from(["s1", "s2", "shared"]), st.text(max_size=140))
keys = st.one_of(st.sampled_from(KEYS), st.none(), st.text(max_size=30))
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 0.6, 1.0, 2.0, -1.0, math.nan]),
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=8))


FIELDS = (
    "key",
    "session",
    "roles",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "stop",
    "preamble",
    "keywords",
    "continue_tokens",
)
valid_sessions = st.sampled_from(["s1", "s2", "shared"])
valid_text = st.text(st.characters(codec="utf-8"), max_size=40)


@st.composite
def takeovers(draw: st.DrawFn) -> tuple[str | None, pb.TakeoverRequest, str]:
    """A request whose fields are valid except for up to two chosen at random."""
    bad = draw(st.sets(st.sampled_from(FIELDS), max_size=2))

    def pick(name: str, good: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> Any:
        return draw(anything if name in bad else good)

    key = pick("key", st.sampled_from(KEYS), keys)
    req = pb.TakeoverRequest(session_id=pick("session", valid_sessions, session_ids))
    form = draw(st.sampled_from(["full", "full", "delta", "delta_held", "delta_held", "none"]))
    if form == "full":
        for _ in range(draw(st.integers(1, 3))):
            req.full.messages.add(
                role=pick("roles", st.sampled_from(["system", "user"]), roles),
                content=draw(valid_text),
            )
        req.full.assistant_text = MARK.get(key or "", "") + draw(valid_text)
    elif form in ("delta", "delta_held"):
        req.delta.base_length = draw(st.integers(0, 2**64 - 1))
        req.delta.base_sha256 = draw(st.one_of(st.text(max_size=70), st.just(text_digest("")[1])))
        req.delta.append = draw(valid_text)
    req.sampling.temperature = pick("temperature", st.floats(0, 2, width=32), floats)
    req.sampling.top_p = pick("top_p", st.floats(0, 1, width=32), floats)
    req.sampling.top_k = pick("top_k", st.integers(0, 1000), st.integers(0, 2**32 - 1))
    req.sampling.has_seed = draw(st.booleans())
    req.sampling.seed = draw(st.integers(0, 2**64 - 1))
    req.write.max_tokens = pick("max_tokens", st.integers(1, 32), st.integers(0, 2**32 - 1))
    req.write.stop.extend(
        pick(
            "stop",
            st.lists(st.text(min_size=1, max_size=8), max_size=3),
            st.lists(text, max_size=10),
        )
    )
    req.write.preamble = pick("preamble", st.text(max_size=20), st.text(max_size=600))
    req.write.continue_if_contains.extend(
        pick(
            "keywords",
            st.lists(st.sampled_from(["wait", "check", "c"]), max_size=3),
            st.lists(st.text(max_size=70), max_size=40),
        )
    )
    req.write.continue_tokens = pick(
        "continue_tokens", st.integers(0, 8), st.integers(0, 2**32 - 1)
    )
    return key, req, form


def _metadata(key: str | None) -> list[tuple[str, str]]:
    return [] if key is None else [("authorization", f"Bearer {key}")]


def _ctx(key: str | None) -> Any:
    """A FakeContext, typed loosely so it passes for a grpc.ServicerContext."""
    return FakeContext(_metadata(key))


def _takeover(world: World, key: str | None, req: pb.TakeoverRequest, form: str) -> None:
    held_key = (key or "", req.session_id)
    if form == "delta_held" and held_key in world.held:  # a valid delta, sometimes
        req.delta.base_length, req.delta.base_sha256 = text_digest(world.held[held_key])
    context = _ctx(key)
    events: list[pb.TakeoverEvent] = []
    try:
        for event in world.servicer.Takeover(req, context):
            events.append(event)
    except Aborted as exc:
        assert exc.code in PROPER, (exc.code, exc.details)
        for mark in MARK.values():
            assert mark not in exc.details
        return
    assert key in KEYS, "an unauthenticated call succeeded"
    assert events and events[-1].WhichOneof("event") == "done"
    written = "".join(e.chunk.text for e in events[:-1])
    if req.WhichOneof("text") == "full":
        before = req.full.assistant_text
    else:
        before = world.held[held_key] + req.delta.append
    done = events[-1].done
    assert (done.committed_length, done.committed_sha256) == text_digest(before + written)
    world.held[held_key] = before + written


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(takeovers(), min_size=1, max_size=6))
def test_random_takeovers_get_proper_statuses_and_never_cross_keys(
    calls: list[tuple[str | None, pb.TakeoverRequest, str]],
) -> None:
    world = World()
    for key, req, form in calls:
        _takeover(world, key, req, form)
    # isolation: every text the engine saw for a key's session holds only that key's mark
    for call in world.engine.calls:
        session, assistant_text = call.session, call.assistant_text
        owner = session.split("/", 1)[0]
        for k, mark in MARK.items():
            if mark in assistant_text:
                assert key_id(k) == owner, "one key's text reached another key's session"


@settings(max_examples=100, deadline=None)
@given(key=keys, session=session_ids, use_delta=st.booleans(), append=text)
def test_random_prefill_and_end_session_get_proper_statuses(
    key: str | None, session: str, use_delta: bool, append: str
) -> None:
    world = World()
    req = pb.PrefillRequest(session_id=session)
    if use_delta:
        req.delta.base_length, req.delta.base_sha256 = text_digest("")
        req.delta.append = append
    else:
        req.full.messages.add(role="user", content=append)
    for call in (
        lambda: world.servicer.Prefill(req, _ctx(key)),
        lambda: world.servicer.EndSession(pb.EndSessionRequest(session_id=session), _ctx(key)),
        lambda: world.servicer.GetModelInfo(pb.ModelInfoRequest(), _ctx(key)),
    ):
        try:
            call()
        except Aborted as exc:
            assert exc.code in PROPER, (exc.code, exc.details)


@pytest.mark.parametrize("rpc", ["Takeover", "Prefill", "GetModelInfo", "EndSession"])
def test_unparsable_request_is_invalid_argument(rpc: str) -> None:
    world = World()
    method = getattr(world.servicer, rpc)
    with pytest.raises(Aborted) as bad:
        result = method(
            Malformed("request is not valid (strings must be valid UTF-8)"),
            _ctx(KEYS[0]),
        )
        if rpc == "Takeover":
            list(result)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
