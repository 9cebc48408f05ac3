"""Engine health: whether the engine still works, for gRPC health and metrics. No torch, no grpc.

The engine loop (`cloud.engine_thread.EngineThread`) reports every step to an
`EngineHealth`: `step_began`, `step_failed` (any error inside the step, with its class
and message), `step_ended`, and `calls_finished` when calls end with their result. The
error streak counts failed steps since a call last finished: an engine whose prefill
works and whose decode always fails finishes nothing, so its streak grows call by call.
`judge` turns that pulse, the server's phase and the limits into one `Verdict` per
moment: what readiness and liveness say, and why.

  reason        readiness  liveness  when
  loading       no         yes       the model loads or warms up (the startup probe waits)
  draining      no         yes       SIGTERM: in-flight takeovers finish, nothing new comes
  ok            yes        yes       fewer than `error_streak` failed steps since a call
                                     last finished
  step_errors   no         yes       `error_streak` steps failed and no call finished since:
                                     out of the endpoints; a canary (see cloud.server)
                                     tests the idle engine and brings it back when it works
  sticky_error  no         no        a step failed with an error after which the device
                                     never works again (an illegal memory access, a
                                     device-side assert: the CUDA context is lost): restart
  failing       no         no        steps have failed with no call finishing for longer
                                     than `stall_s`: whatever it is, it does not heal: restart
  stalled       no         no        one step has run for longer than `stall_s` (a hung
                                     kernel, a deadlock): restart

A step is one turn of the engine loop (retire, admit, prefill, decode); an idle engine runs
none, so an idle engine is never judged stalled.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cloud.engine_api import EngineCancelled, EngineContextFull

LOADING = "loading"  # reasons, and LOADING / IN_SERVICE / DRAINING the server's phases
IN_SERVICE = "serving"
DRAINING = "draining"
OK = "ok"
STEP_ERRORS = "step_errors"
STICKY_ERROR = "sticky_error"
FAILING = "failing"
STALLED = "stalled"
REASONS = (LOADING, DRAINING, OK, STEP_ERRORS, STICKY_ERROR, FAILING, STALLED)

# Errors after which a CUDA context is unusable: every later kernel fails the same way.
# (PyTorch: "CUDA kernel errors might be asynchronously reported ... the process must exit")
_STICKY = re.compile(
    r"illegal memory access|device-side assert|unspecified launch failure|"
    r"misaligned address|illegal instruction|uncorrectable ECC error|"
    r"CUDA error: unknown error|CUDA driver (error|version is insufficient)|"
    r"cudaErrorLaunchFailure|CUBLAS_STATUS_EXECUTION_FAILED|NCCL error",
    re.IGNORECASE,
)


def is_sticky(error: BaseException) -> bool:
    """True for an error that leaves the device unusable for the rest of the process."""
    return bool(_STICKY.search(f"{type(error).__name__}: {error}"))


@dataclass(frozen=True)
class HealthLimits:
    stall_s: float = 60.0  # a step longer than this, or errors without a success this long
    error_streak: int = 2  # this many failed steps in a row: not ready


@dataclass(frozen=True)
class Pulse:
    """What the engine loop reported, as of one moment."""

    steps: int = 0  # steps ended (failed or not)
    ended_at: float | None = None  # when the last step ended
    step_since: float | None = None  # when the step now running began; None between steps
    last_ok: float | None = None  # when a call last finished with its result
    streak: int = 0  # steps that failed since a call last finished
    streak_since: float | None = None  # when the first of those failed
    last_error: str = ""  # "Class: message" of the last step error
    sticky: bool = False  # the last failed step's error was a sticky device error


@dataclass(frozen=True)
class Verdict:
    ready: bool
    live: bool
    reason: str  # one of REASONS
    detail: str = ""  # words for the log: the error, how long the step has run


def judge(pulse: Pulse, now: float, limits: HealthLimits, phase: str = IN_SERVICE) -> Verdict:
    """Readiness and liveness for this pulse. `phase`: "loading", "serving" or "draining"
    (the server's life cycle; the engine's state overrides it when it is worse)."""
    if pulse.step_since is not None and now - pulse.step_since > limits.stall_s:
        ran = now - pulse.step_since
        return Verdict(False, False, STALLED, f"one step has run for {ran:.1f} s")
    if pulse.streak and pulse.sticky:
        return Verdict(False, False, STICKY_ERROR, pulse.last_error)
    since = pulse.streak_since if pulse.streak_since is not None else now
    if pulse.streak and now - since > limits.stall_s:
        detail = f"{pulse.streak} steps failed in {now - since:.1f} s: {pulse.last_error}"
        return Verdict(False, False, FAILING, detail)
    if phase == LOADING:
        return Verdict(False, True, LOADING)
    if phase == DRAINING:
        return Verdict(False, True, DRAINING)
    if pulse.streak >= limits.error_streak:
        return Verdict(False, True, STEP_ERRORS, f"{pulse.streak} in a row: {pulse.last_error}")
    return Verdict(True, True, OK)


@dataclass
class EngineHealth:
    """The engine's pulse, written by the engine thread and read by the server's monitor.

    `on_error(error)` is called (in the engine thread) for every step error: metrics, logs."""

    on_error: Callable[[BaseException], None] | None = None
    clock: Callable[[], float] = time.monotonic
    _pulse: Pulse = field(default_factory=Pulse)
    _failed_now: BaseException | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def step_began(self) -> None:
        with self._lock:
            self._failed_now = None
            self._pulse = dataclasses.replace(self._pulse, step_since=self.clock())

    def step_failed(self, error: BaseException) -> None:
        """An error inside the step (the step may still deliver to other calls). A call that
        was cancelled or did not fit is that call's outcome, not the engine's failure."""
        if isinstance(error, (EngineCancelled, EngineContextFull)):
            return
        with self._lock:
            self._failed_now = error
        if self.on_error is not None:
            self.on_error(error)

    def step_ended(self) -> None:
        now = self.clock()
        with self._lock:
            p, error = self._pulse, self._failed_now
            if error is None:
                self._pulse = dataclasses.replace(
                    p, steps=p.steps + 1, ended_at=now, step_since=None
                )
                return
            self._pulse = dataclasses.replace(
                p,
                steps=p.steps + 1,
                ended_at=now,
                step_since=None,
                streak=p.streak + 1,
                streak_since=p.streak_since if p.streak else p.step_since,
                last_error=f"{type(error).__name__}: {error}".splitlines()[0][:300],
                sticky=is_sticky(error),
            )

    def calls_finished(self, n: int = 1) -> None:
        """Calls ended with their result: the engine works, whatever failed before."""
        if n <= 0:
            return
        now = self.clock()
        with self._lock:
            self._pulse = dataclasses.replace(
                self._pulse, last_ok=now, streak=0, streak_since=None, sticky=False
            )

    def pulse(self) -> Pulse:
        with self._lock:
            return self._pulse

    def now(self) -> float:
        return self.clock()
