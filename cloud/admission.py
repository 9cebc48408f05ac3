"""Admission control: a bounded FIFO in front of the engine, which decodes up to
`max_running` calls together (its batch-size limit, sized from memory at load).

Up to `max_running` requests run at once: each joins the engine's batch at its next
step. Beyond that, requests wait in FIFO order by ticket, so no session starves; beyond
`max_waiting` waiting requests (or `max_waiting_tokens` of queued prefill) a request is
refused at once with `Overloaded` and a retry hint, rather than queued into a timeout.
A waiter that is cancelled, times out or is drained leaves the queue without running.
No torch here.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from shared import errors


@dataclass(frozen=True)
class AdmissionLimits:
    max_running: int = 1
    max_waiting: int = 32
    max_waiting_tokens: int = 262_144


@dataclass
class Ticket:
    number: int
    tokens: int
    queued_at: float
    started_at: float = 0.0

    @property
    def queue_s(self) -> float:
        return self.started_at - self.queued_at


class Admission:
    def __init__(self, limits: AdmissionLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self._cond = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._running = 0
        self._numbers = itertools.count()
        self._closed = False
        self._mean_run_s = 1.0  # smoothed service time, for the retry hint

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Admit nothing more; waiters leave with Unavailable (graceful drain)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _retry_hint(self) -> float:
        """Seconds until a place is likely free, between 50 ms and 30 s. With a full batch
        a place frees every mean_run_s / max_running on average (a smoothed service time
        per request, measured while batched), and the queue ahead needs one place each."""
        per_place = self._mean_run_s / max(1, self.limits.max_running)
        return max(0.05, min(30.0, per_place * (len(self._queue) + 1)))

    @contextmanager
    def slot(self, tokens: int, should_stop: Callable[[], bool]) -> Iterator[Ticket]:
        """Wait for a turn at the engine; raise Overloaded at once when the queue is full."""
        with self._cond:
            if self._closed:
                raise errors.Unavailable("server is draining")
            queued_tokens = sum(t.tokens for t in self._queue)
            must_wait = bool(self._queue) or self._running >= self.limits.max_running
            if must_wait and (
                len(self._queue) >= self.limits.max_waiting
                or (self._queue and queued_tokens + tokens > self.limits.max_waiting_tokens)
            ):
                raise errors.Overloaded(
                    f"queue full ({len(self._queue)} waiting); retry later",
                    retry_after_s=self._retry_hint(),
                )
            ticket = Ticket(next(self._numbers), tokens, self.clock())
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket and self._running < self.limits.max_running):
                    if self._closed:
                        raise errors.Unavailable("server is draining")
                    if should_stop():
                        raise errors.Cancelled("cancelled while queued")
                    self._cond.wait(timeout=0.05)
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._running += 1
            ticket.started_at = self.clock()
        try:
            yield ticket
        finally:
            with self._cond:
                self._running -= 1
                ran = self.clock() - ticket.started_at
                self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * ran
                self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing runs or waits (or the timeout); True when idle."""
        deadline = self.clock() + timeout_s
        with self._cond:
            while self._running or self._queue:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.1))
        return True
