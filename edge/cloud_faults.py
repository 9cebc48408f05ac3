"""What the edge's client keeps about a cloud's health, apart from the calls themselves:
the circuit breaker (stop asking a cloud that keeps failing), the cloud's measured pace,
and the stall watch (cancel a call whose cloud stopped talking). No grpc: each works on
callables and a clock, so tests drive them with recorded events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from shared.wire import TakeoverDone


class CircuitBreaker:
    """Closed -> (N failures in a row) -> open for a cooldown -> half-open: one probe call.

    A successful probe closes it; a failed probe opens it again for twice the cooldown (up
    to `max_cooldown_s`), so a cloud that stays dead is asked less and less often and one
    that flaps is not hammered. While open, calls fail at once without touching the
    network. Only takeovers probe: `closed` tells optional calls (prefill) to stay away."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_cooldown_s: float | None = None,
    ):
        self.failures = failures
        self.base_cooldown_s = cooldown_s
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s if max_cooldown_s is not None else 8 * cooldown_s
        self.clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()
        self.opened = 0  # times it opened (for stats and tests)

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self._opened_at >= self.cooldown_s else "open"

    @property
    def closed(self) -> bool:
        return self._opened_at is None

    def allow(self) -> bool:
        """May a call go out now? In half-open state, True for one caller (the probe)."""
        with self._lock:
            state = self.state
            if state == "closed":
                return True
            if state == "half-open" and not self._probing:
                self._probing = True
                return True
            return False

    def record(self, ok: bool) -> None:
        """The outcome of an allowed call: the cloud answered (ok) or could not be used."""
        with self._lock:
            probe, self._probing = self._probing, False
            if ok:
                self._consecutive, self._opened_at = 0, None
                self.cooldown_s = self.base_cooldown_s
                return
            self._consecutive += 1
            if probe and self._opened_at is not None:  # the probe failed: wait longer
                self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
                self._opened_at = self.clock()
            elif self._opened_at is None and self._consecutive >= self.failures:
                self._opened_at = self.clock()
                self.opened += 1

    def release(self) -> None:
        """An allowed call ended without telling (abandoned, Ctrl-C): free the probe."""
        with self._lock:
            self._probing = False

    def trip(self) -> None:
        """Open now, whatever the count: the cloud is known to be unusable (it froze in the
        middle of a call). A probe that froze waits twice as long, as a failed probe does."""
        with self._lock:
            probe, self._probing = self._probing, False
            self._consecutive = max(self._consecutive + 1, self.failures)
            if probe and self._opened_at is not None:
                self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
            elif self._opened_at is None:
                self.opened += 1
            self._opened_at = self.clock()


@dataclass
class CloudPace:
    """The cloud's measured seconds per written token and per prefilled token, from the
    timings of its finished takeovers. Leans to the slow side (a slower call counts at
    once, a faster one only partly), so one quick call does not shrink the stall timeouts."""

    decode_s: float = 0.0
    prefill_s: float = 0.0
    samples: int = 0

    def observe(self, done: TakeoverDone) -> None:
        usage, timings = done.usage, done.timings
        if usage.generated_tokens > 0 and timings.decode_s > 0:
            self.decode_s = _lean_slow(self.decode_s, timings.decode_s / usage.generated_tokens)
        if usage.prefilled_tokens > 0 and timings.prefill_s > 0:
            self.prefill_s = _lean_slow(self.prefill_s, timings.prefill_s / usage.prefilled_tokens)
        self.samples += 1


def _lean_slow(old: float, new: float) -> float:
    return new if old <= 0 else max(new, 0.8 * old + 0.2 * new)


class StallWatch:
    """Watches one streaming call from its own thread and cancels it when the cloud stops
    talking. Before the first chunk: every `first_s` without one, ask `alive()`; a cloud
    that answers is queueing or prefilling (wait on), one that does not is given up. Once
    chunks flow: a gap of more than `gap_s` gives up. `why` then says which, and the
    caller turns the cancelled call into `errors.Stalled`. A limit of 0 switches it off."""

    def __init__(
        self, cancel: Callable[[], object], first_s: float, gap_s: float, alive: Callable[[], bool]
    ) -> None:
        self.cancel, self.first_s, self.gap_s, self.alive = cancel, first_s, gap_s, alive
        self.chunks = 0
        self.alive_checks = 0
        self.why: str | None = None
        self._heard = threading.Event()
        self._over = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)

    def __enter__(self) -> StallWatch:
        if self.first_s > 0 or self.gap_s > 0:
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._over.set()
        self._heard.set()

    def heard(self) -> None:
        """The cloud sent something."""
        self.chunks += 1
        self._heard.set()

    def _watch(self) -> None:
        while True:
            limit = self.first_s if self.chunks == 0 else self.gap_s
            heard = self._heard.wait(limit if limit > 0 else None)
            if self._over.is_set():
                return
            if heard:
                self._heard.clear()
                continue
            if self.chunks == 0:
                self.alive_checks += 1
                if self.alive():
                    continue  # there, but busy: queued behind others, or a long prefill
                self.why = f"no text within {self.first_s:g} s and no answer to a liveness check"
            else:
                self.why = f"no text for {self.gap_s:g} s in the middle of its answer"
            self.cancel()
            return
