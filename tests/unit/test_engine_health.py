"""Engine health as a table: a pulse, the server's phase and the limits -> readiness,
liveness and the reason (cloud.health.judge); the pulse as the engine loop writes it; and
the engine loop reporting a scripted engine's failing steps."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cloud import engine_api
from cloud.engine_api import EngineCancelled
from cloud.engine_thread import EngineThread
from cloud.health import (
    DRAINING,
    FAILING,
    IN_SERVICE,
    LOADING,
    OK,
    STALLED,
    STEP_ERRORS,
    STICKY_ERROR,
    EngineHealth,
    HealthLimits,
    Pulse,
    is_sticky,
    judge,
)
from shared.wire import Message, Sampling
from tests.unit.test_engine_thread import ScriptedStepEngine

LIMITS = HealthLimits(stall_s=60.0, error_streak=2)
NOW = 1000.0
BOOM = "RuntimeError: boom"
CUDA = "RuntimeError: CUDA error: an illegal memory access was encountered"


@pytest.mark.parametrize(
    ("pulse", "phase", "expected"),
    [
        (Pulse(), LOADING, (False, True, LOADING)),
        (Pulse(), IN_SERVICE, (True, True, OK)),
        (Pulse(), DRAINING, (False, True, DRAINING)),
        (Pulse(step_since=NOW - 59), IN_SERVICE, (True, True, OK)),  # a long step, in limit
        (Pulse(step_since=NOW - 61), IN_SERVICE, (False, False, STALLED)),
        (Pulse(step_since=NOW - 61), DRAINING, (False, False, STALLED)),
        (Pulse(streak=1, streak_since=NOW - 1, last_error=BOOM), IN_SERVICE, (True, True, OK)),
        (
            Pulse(streak=2, streak_since=NOW - 3, last_error=BOOM),
            IN_SERVICE,
            (False, True, STEP_ERRORS),
        ),
        (
            Pulse(streak=9, streak_since=NOW - 61, last_error=BOOM),
            IN_SERVICE,
            (False, False, FAILING),
        ),
        (
            Pulse(streak=1, streak_since=NOW, last_error=CUDA, sticky=True),
            IN_SERVICE,
            (False, False, STICKY_ERROR),
        ),
        (Pulse(streak=2, streak_since=NOW - 3, last_error=BOOM), DRAINING, (False, True, DRAINING)),
    ],
)
def test_verdict_table(pulse: Pulse, phase: str, expected: tuple[bool, bool, str]) -> None:
    verdict = judge(pulse, NOW, LIMITS, phase)
    assert (verdict.ready, verdict.live, verdict.reason) == expected


@pytest.mark.parametrize(
    ("message", "sticky"),
    [
        ("CUDA error: an illegal memory access was encountered", True),
        ("CUDA error: device-side assert triggered", True),
        ("CUDA error: unspecified launch failure", True),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", False),  # shed load, not restart
        ("shape mismatch", False),
    ],
)
def test_sticky_errors_are_the_ones_a_cuda_context_never_recovers_from(
    message: str, sticky: bool
) -> None:
    assert is_sticky(RuntimeError(message)) is sticky


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_pulse_counts_failed_steps_until_a_call_finishes() -> None:
    clock, seen = Clock(), []
    health = EngineHealth(on_error=seen.append, clock=clock)
    for t in (1.0, 2.0):
        clock.t = t
        health.step_began()
        health.step_failed(RuntimeError("boom"))
        health.step_ended()
    p = health.pulse()
    assert (p.steps, p.streak, p.streak_since, p.last_error) == (2, 2, 1.0, BOOM)
    assert len(seen) == 2 and p.step_since is None
    clock.t = 3.0
    health.step_began()
    assert health.pulse().step_since == 3.0
    health.step_ended()  # a step without an error (a prefill) is not yet a working engine
    assert health.pulse().streak == 2
    health.calls_finished(1)  # a call that ends with its result is
    p = health.pulse()
    assert (p.steps, p.streak, p.last_ok, p.ended_at) == (3, 0, 3.0, 3.0)


def test_a_cancelled_call_is_not_an_engine_failure() -> None:
    health = EngineHealth()
    health.step_began()
    health.step_failed(EngineCancelled("client went away"))
    health.step_ended()
    assert health.pulse().streak == 0


def _generate(loop: EngineThread, session: str) -> None:
    """One 2-token call through the loop (a request object where the engine API has one)."""
    request_type = getattr(engine_api, "GenerateRequest", None)
    if request_type is None:
        call: Any = loop.generate
        list(call(session, [Message("user", "hi")], "abc", 2, Sampling(), (), lambda: False))
        return
    request = request_type(session, (Message("user", "hi"),), "abc", 2, Sampling(), ())
    list(loop.generate(request, lambda: False))


def test_engine_loop_reports_every_step_and_each_step_error() -> None:
    engine = ScriptedStepEngine()
    errors: list[BaseException] = []
    health = EngineHealth(on_error=errors.append)
    loop = EngineThread(engine, health=health)
    try:
        _generate(loop, "good")
        good = health.pulse()
        assert good.steps >= 2 and good.streak == 0 and good.last_ok is not None
        engine.fail_decode_of = "bad"
        for _ in range(2):
            with pytest.raises(RuntimeError, match="the model broke"):
                _generate(loop, "bad")
        bad = health.pulse()
        # each call's prefill works and its decode fails: no call finishes, the streak grows
        assert bad.streak == 2 and bad.last_error == "RuntimeError: the model broke"
        assert [type(e) for e in errors] == [RuntimeError] * len(errors) and len(errors) == 2
        assert judge(bad, health.now(), LIMITS).reason == STEP_ERRORS
        engine.fail_decode_of = None
        _generate(loop, "good again")
        assert health.pulse().streak == 0
        assert judge(health.pulse(), health.now(), LIMITS).reason == OK
    finally:
        loop.close()


def test_engine_loop_shows_a_step_that_does_not_return() -> None:
    engine = ScriptedStepEngine()
    health = EngineHealth()
    loop = EngineThread(engine, health=health)
    engine.gate.clear()  # start() blocks: the step hangs
    worker = threading.Thread(target=_generate, args=(loop, "stuck"), daemon=True)
    worker.start()
    try:
        for _ in range(500):
            if health.pulse().step_since is not None:
                break
            threading.Event().wait(0.01)
        began = health.pulse().step_since
        assert began is not None
        verdict = judge(health.pulse(), began + 61, LIMITS)
        assert (verdict.ready, verdict.live, verdict.reason) == (False, False, STALLED)
    finally:
        engine.gate.set()
        worker.join(5)
        loop.close()
    assert health.pulse().step_since is None
