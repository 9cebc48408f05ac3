"""The edge's cloud client without a network: the circuit breaker on a fake clock, and the
retry / budget rules of `GrpcCloud.takeover` around a scripted stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from edge.cloud_client import ClientOptions, GrpcCloud
from edge.cloud_faults import CircuitBreaker
from shared import errors
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
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


# ---- the breaker ------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_refuses_without_the_network() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(ok=False)
    assert breaker.state == "closed"
    assert breaker.allow()
    breaker.record(ok=False)
    assert breaker.state == "open"
    assert [breaker.allow() for _ in range(5)] == [False] * 5
    clock.sleep(9.9)
    assert not breaker.allow()


def test_a_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=FakeClock())
    breaker.record(ok=False)
    breaker.record(ok=True)
    breaker.record(ok=False)
    assert breaker.state == "closed"


def test_breaker_probes_once_after_the_cooldown_and_a_good_probe_closes_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, cooldown_s=10, clock=clock)
    breaker.record(ok=False)
    clock.sleep(10)
    assert breaker.state == "half-open"
    assert breaker.allow(), "one probe goes out"
    assert not breaker.allow(), "... and only one"
    breaker.record(ok=True)
    assert breaker.state == "closed" and breaker.allow()


def test_a_failed_probe_waits_twice_as_long_before_the_next_no_flapping() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, cooldown_s=10, clock=clock, max_cooldown_s=25)
    breaker.record(ok=False)
    waits = []
    for _ in range(3):
        start = clock.now
        while not breaker.allow():
            clock.sleep(1)
        waits.append(clock.now - start)
        breaker.record(ok=False)  # the probe failed
    assert waits == [10, 20, 25]
    clock.sleep(25)
    assert breaker.allow()
    breaker.record(ok=True)
    breaker.record(ok=False)  # closed again, with the short cooldown back
    clock.sleep(10)
    assert breaker.state == "half-open"


def test_an_abandoned_probe_frees_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, cooldown_s=5, clock=clock)
    breaker.record(ok=False)
    clock.sleep(5)
    assert breaker.allow()
    breaker.release()  # the probe was cancelled (Ctrl-C) before it said anything
    assert breaker.allow()


# ---- takeover retries -------------------------------------------------------------------


CALL = TakeoverCall(
    "s1", FullText((Message("user", "hi"),), ""), Sampling(), WriteSpec(max_tokens=2)
)
DONE = TakeoverDone(FINISH_LENGTH, Usage(1, 0, 1, 2), Timings(), None, 2, "0" * 64)


def scripted_cloud(
    outcomes: list[Any],
    clock: FakeClock,
    **options: object,
) -> tuple[GrpcCloud, list[str], list[str]]:
    """A GrpcCloud whose connect succeeds and whose streams follow `outcomes`: an error
    raised before any event, or a list of events (an error inside it is raised there)."""
    options.setdefault("per_token_timeout_s", 0.0)
    opts = ClientOptions(address="127.0.0.1:1", **options)  # type: ignore[arg-type]
    notices: list[str] = []
    cloud = GrpcCloud(opts, sleep=clock.sleep, clock=clock, notify=notices.append)
    streamed: list[str] = []

    def connect(budget_s: float | None = None) -> None:
        return None

    def stream(call: TakeoverCall, timeout_s: float) -> Iterator[TextChunk | TakeoverDone]:
        streamed.append(f"timeout={timeout_s:g}")
        outcome = outcomes.pop(0)
        if isinstance(outcome, errors.SpecThinkError):
            raise outcome
        for event in outcome:
            if isinstance(event, errors.SpecThinkError):
                raise event
            yield event

    cloud._connect = connect  # type: ignore[method-assign]
    cloud._stream = stream  # type: ignore[method-assign,assignment]
    return cloud, streamed, notices


def test_unavailable_is_retried_with_backoff_until_the_cloud_answers() -> None:
    clock = FakeClock()
    cloud, streamed, notices = scripted_cloud(
        [errors.Unavailable("reset"), errors.Unavailable("reset"), [TextChunk("ok", 1), DONE]],
        clock,
    )
    events = list(cloud.takeover(CALL))
    assert events == [TextChunk("ok", 1), DONE]
    assert cloud.retries == 2 and len(streamed) == 3
    assert cloud.breaker.state == "closed"
    assert len(notices) == 2 and "retry 1/2" in notices[0]


def test_overloaded_is_retried_after_the_servers_hint() -> None:
    clock = FakeClock()
    sleeps: list[float] = []
    cloud, _, _ = scripted_cloud(
        [errors.Overloaded("full", retry_after_s=0.7), [TextChunk("ok", 1), DONE]], clock
    )
    cloud.sleep = lambda s: (sleeps.append(s), clock.sleep(s))  # type: ignore[assignment,func-returns-value]
    assert list(cloud.takeover(CALL))[-1] == DONE
    assert sleeps == [0.7]


def test_a_hint_longer_than_the_takeover_budget_falls_back_at_once() -> None:
    clock = FakeClock()
    cloud, streamed, _ = scripted_cloud(
        [errors.Overloaded("full", retry_after_s=5.0), [DONE]],
        clock,
        takeover_timeout_s=3.0,
        max_backoff_s=10.0,
    )
    with pytest.raises(errors.Overloaded):
        list(cloud.takeover(CALL))
    assert len(streamed) == 1 and cloud.retries == 0


def test_every_attempt_gets_only_what_is_left_of_the_takeover_budget() -> None:
    clock = FakeClock()
    cloud, streamed, _ = scripted_cloud(
        [errors.Overloaded("full", retry_after_s=1.0), [DONE]], clock, takeover_timeout_s=10.0
    )
    list(cloud.takeover(CALL))
    assert streamed == ["timeout=10", "timeout=9"]


def test_a_deadline_is_not_retried() -> None:
    clock = FakeClock()
    cloud, streamed, _ = scripted_cloud(
        [errors.DeadlineExceeded("late")], clock, takeover_timeout_s=5.0
    )

    def late(call: TakeoverCall, timeout_s: float) -> Iterator[TextChunk | TakeoverDone]:
        streamed.append("late")
        clock.sleep(timeout_s)
        raise errors.DeadlineExceeded("late")
        yield DONE  # pragma: no cover

    cloud._stream = late  # type: ignore[method-assign,assignment]
    with pytest.raises(errors.DeadlineExceeded):
        list(cloud.takeover(CALL))
    assert streamed == ["late"]


def test_a_failure_after_text_arrived_is_not_retried() -> None:
    clock = FakeClock()
    cloud, streamed, _ = scripted_cloud(
        [[TextChunk("half", 1), errors.Unavailable("reset")], [DONE]], clock
    )
    received = []
    with pytest.raises(errors.Unavailable):
        for event in cloud.takeover(CALL):
            received.append(event)
    assert received == [TextChunk("half", 1)] and len(streamed) == 1


@pytest.mark.parametrize(
    "error",
    [
        errors.Unauthenticated("bad key"),
        errors.InvalidRequest("too long"),
        errors.BaseMismatch("x"),
    ],
)
def test_errors_retrying_cannot_fix_are_raised_at_once_and_do_not_open_the_breaker(
    error: errors.SpecThinkError,
) -> None:
    clock = FakeClock()
    cloud, streamed, _ = scripted_cloud([error] * 5, clock, breaker_failures=1)
    for _ in range(3):
        with pytest.raises(type(error)):
            list(cloud.takeover(CALL))
    assert len(streamed) == 3 and cloud.retries == 0
    assert cloud.breaker.state == "closed"


def test_a_lost_session_is_announced_for_the_full_text_resend() -> None:
    cloud, _, notices = scripted_cloud([errors.BaseMismatch("no base")], FakeClock())
    with pytest.raises(errors.BaseMismatch):
        list(cloud.takeover(CALL))
    assert notices == [
        "the cloud no longer holds this answer (restarted or evicted); sending the full text again"
    ]


def test_a_dead_cloud_is_left_alone_until_the_cooldown_then_probed_once() -> None:
    clock = FakeClock()
    dead = [errors.Unavailable("refused")] * 3
    cloud, streamed, _ = scripted_cloud(
        [*dead, errors.Unavailable("refused"), [DONE]],
        clock,
        breaker_failures=3,
        breaker_cooldown_s=15.0,
        max_attempts=3,
    )
    with pytest.raises(errors.Unavailable):
        list(cloud.takeover(CALL))  # three attempts: the breaker opens
    assert len(streamed) == 3 and cloud.breaker.state == "open"
    for _ in range(10):  # every takeover now falls back at once, without the network
        with pytest.raises(errors.Unavailable, match="circuit open"):
            list(cloud.takeover(CALL))
    assert len(streamed) == 3
    clock.sleep(15)
    with pytest.raises(errors.Unavailable):  # the probe fails: open again, longer
        list(cloud.takeover(CALL))
    assert len(streamed) == 4
    clock.sleep(15)
    with pytest.raises(errors.Unavailable, match="circuit open"):
        list(cloud.takeover(CALL))
    clock.sleep(15)
    assert list(cloud.takeover(CALL)) == [DONE]  # the cloud is back
    assert cloud.breaker.state == "closed" and len(streamed) == 5


def test_prefill_never_spends_the_probe_of_a_half_open_breaker() -> None:
    clock = FakeClock()
    cloud, _, _ = scripted_cloud([], clock, breaker_failures=1, breaker_cooldown_s=5.0)
    cloud.breaker.record(ok=False)
    clock.sleep(5)
    with pytest.raises(errors.Unavailable, match="circuit open"):
        cloud.prefill("s1", FullText((Message("user", "hi"),), ""))
    assert cloud.breaker.allow(), "the probe is still there for a takeover"


def test_a_probe_interrupted_by_ctrl_c_does_not_leave_the_breaker_stuck_open() -> None:
    clock = FakeClock()
    cloud, _, _ = scripted_cloud([], clock, breaker_failures=1, breaker_cooldown_s=5.0)
    cloud.breaker.record(ok=False)
    clock.sleep(5)

    def interrupted(budget_s: float | None = None) -> None:
        raise KeyboardInterrupt

    cloud._connect = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        list(cloud.takeover(CALL))
    assert cloud.breaker.allow(), "the next takeover may probe"


def test_takeover_budget_grows_with_the_tokens_it_may_write():
    clock = FakeClock()
    cloud, streamed, _ = scripted_cloud(
        [[DONE]], clock, takeover_timeout_s=10.0, per_token_timeout_s=0.5
    )
    long_call = TakeoverCall(
        "s1",
        FullText((Message("user", "hi"),), ""),
        Sampling(),
        WriteSpec(max_tokens=20, continue_if=("check",), continue_tokens=125),
    )
    assert cloud.takeover_budget_s(long_call) == 10.0 + 145 * 0.5
    list(cloud.takeover(long_call))
    assert streamed == ["timeout=82.5"]
