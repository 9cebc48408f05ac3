"""The engine loop: one thread runs every model step, for all calls at once (continuous batching).

gRPC serves each request on whichever worker thread is free. torch's OpenMP pool belongs
to the thread that calls into it, so here one thread does all model work, as the engine
loop does in vLLM or TGI; request threads only plan their call (tokenize) and pass chunks
along. No torch is imported: this drives any `cloud.engine_api.StepEngine`.

One step of the loop, in the order `_step` runs it:

  retire   calls whose caller stopped reading, was cancelled, superseded or ran past its
           deadline leave now (should_stop() is checked for every call, every step)
  admit    waiting calls join, first come first served, while fewer than `max_running`
           run; a call waits while another call on its session runs (one at a time each)
  prefill  ONE forward of prompt chunks, for the oldest calls still prefilling (as many
           as the engine's step budget holds): a long prompt delays the running
           decodes by one chunk per step, never by its whole length
  decode   ONE batched forward: a token for every call that is decoding
  shed     a step that runs out of device memory fails nobody: the newest half of the
           calls wait (caches and text kept) and rejoin one by one once steps succeed
  deliver  each call's new chunks go to its caller; finished calls check their caches in

With `max_running=1` this is the one-call-at-a-time engine of before.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud.engine_api import (
    CacheStats,
    EngineCancelled,
    EngineOutOfMemory,
    Generated,
    GenerateRequest,
    Prefilled,
    Run,
    ShouldStop,
    StepEngine,
)
from cloud.health import EngineHealth
from shared.wire import Message, TextChunk

_END = object()
_CALM_STEPS = 32  # decode steps without an out-of-memory before one more call may run


@dataclass
class _Call:
    run: Run
    out: queue.Queue[Any] = field(default_factory=queue.Queue)
    abandoned: threading.Event = field(default_factory=threading.Event)

    def stopped(self) -> bool:
        return self.abandoned.is_set() or self.run.should_stop()

    def deliver(self) -> None:
        for chunk in self.run.take():
            self.out.put(chunk)

    def end(self, error: BaseException | None = None) -> None:
        self.out.put(error if error is not None else self.run.outcome())
        self.out.put(_END)


class EngineThread:
    """A `StepEngine` behind one thread that decodes up to `max_running` calls together."""

    def __init__(
        self,
        engine: StepEngine,
        max_running: int | None = None,
        *,
        health: EngineHealth | None = None,
    ) -> None:
        self.engine = engine
        self.health = health or EngineHealth()  # a heartbeat per step, and each step error
        self.max_running = max(1, max_running or engine.info.max_running)
        self.info = dataclasses.replace(engine.info, max_running=self.max_running)
        self.steps = 0  # decode steps run
        self.batch_sizes: Counter[int] = Counter()  # decode steps by how many calls they held
        self.decoded_tokens = 0  # tokens written by decode steps (the sum of their batch sizes)
        self.decode_s = 0.0  # time spent in decode steps
        self.prefill_chunks = 0
        self.sheds = 0  # steps that ran out of memory and made the newest calls wait
        self._limit = self.max_running  # calls that take part in steps (lower after an OOM)
        self._calm = 0  # decode steps since the last out-of-memory
        self._observers: list[Callable[[int], None]] = []
        self._shed_observers: list[Callable[[int], None]] = []
        self._arrivals: queue.Queue[_Call | None] = queue.Queue()
        self._waiting: deque[_Call] = deque()
        self._running: list[_Call] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def add_step_observer(self, observer: Callable[[int], None]) -> None:
        """Call `observer(batch_size)` after every decode step (metrics)."""
        self._observers.append(observer)

    def add_shed_observer(self, observer: Callable[[int], None]) -> None:
        """Call `observer(calls_left_running)` after every out-of-memory shed (metrics)."""
        self._shed_observers.append(observer)

    def close(self) -> None:
        self._arrivals.put(None)

    # ---- the loop (engine thread) ------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed:
            self._take_arrivals(block=not (self._waiting or self._running))
            self.health.step_began()
            try:
                self._step()
            except BaseException as exc:  # a bug in the loop itself: fail everyone, go on
                self.health.step_failed(exc)
                for call in [*self._running, *self._waiting]:
                    call.end(exc)
                self._running.clear()
                self._waiting.clear()
            self.health.step_ended()
        for call in [*self._running, *self._waiting]:
            call.end(EngineCancelled("engine closed"))

    def _take_arrivals(self, block: bool) -> None:
        try:
            item = self._arrivals.get() if block else self._arrivals.get_nowait()
            while True:
                if item is None:
                    self._closed = True
                    return
                self._waiting.append(item)
                item = self._arrivals.get_nowait()
        except queue.Empty:
            pass

    def _step(self) -> None:
        # retire
        for call in [c for c in self._waiting if c.stopped()]:
            self._waiting.remove(call)
            call.end(EngineCancelled("cancelled while waiting"))
        self._finish([c for c in self._running if c.stopped()], EngineCancelled("cancelled"))
        # admit
        busy = {c.run.session for c in self._running}
        for call in list(self._waiting):
            if len(self._running) >= min(self.max_running, self._limit):
                break
            if call.run.session in busy:
                continue
            self._waiting.remove(call)
            try:
                self.engine.start(call.run)
            except Exception as exc:
                self.health.step_failed(exc)
                self._finish([call], exc)
                continue
            self._running.append(call)
            busy.add(call.run.session)
        # prefill: one forward, for the oldest calls still prefilling (the engine takes a
        # chunk of the first, and of as many others as its step budget holds)
        active = self._running[: self._limit]  # after an OOM the newest wait their turn
        decoding = [c for c in active if not c.run.prefilling and not c.run.done]
        filling = [c for c in active if c.run.prefilling]
        if filling:
            try:
                self.engine.prefill_step([c.run for c in filling], sharing=bool(decoding))
                self.prefill_chunks += 1
            except EngineOutOfMemory as exc:
                self._shed(active, filling, exc)
            except Exception as exc:
                self.health.step_failed(exc)
                self._finish(filling, exc)
            else:
                for call in filling:
                    call.deliver()
        # decode: one token for every decoding call, in one forward
        if decoding:
            started = time.perf_counter()
            try:
                self.engine.decode_step([c.run for c in decoding])
            except EngineOutOfMemory as exc:
                self._shed(active, decoding, exc)
            except Exception as exc:
                self.health.step_failed(exc)
                self._finish(decoding, exc)
            else:
                self.decode_s += time.perf_counter() - started
                self._calm += 1
                if self._limit < self.max_running and self._calm >= _CALM_STEPS:
                    self._limit, self._calm = self._limit + 1, 0  # try one more again
                self.steps += 1
                self.decoded_tokens += len(decoding)
                self.batch_sizes[len(decoding)] += 1
                for observe in self._observers:
                    observe(len(decoding))
                for call in decoding:
                    call.deliver()
        self._finish([c for c in self._running if c.run.done])

    def _shed(self, active: Sequence[_Call], failed: Sequence[_Call], exc: BaseException) -> None:
        """A step ran out of memory (the engine left every run as after its last step):
        the newest half of the active calls wait, keeping their caches and text, until
        `_CALM_STEPS` steps pass without one; a call that runs out of memory alone fails."""
        if len(active) > 1:
            self._limit, self._calm = max(1, len(active) // 2), 0
            self.sheds += 1
            for observe in self._shed_observers:
                observe(self._limit)
        else:
            self.health.step_failed(exc)
            self._finish(failed, exc)

    def _finish(self, calls: Sequence[_Call], error: BaseException | None = None) -> None:
        """Check the calls' caches in (together: a batch gives up its rows once), then end
        each call with its outcome or `error`."""
        if not calls:
            return
        runs = [c.run for c in calls]
        try:
            self.engine.finish(runs)
        except Exception as exc:  # nothing more to save: the callers learn of it
            self.health.step_failed(exc)
            error = error or exc
        if error is None:
            self.health.calls_finished(len(calls))  # the engine works: the error streak ends
        for call in calls:
            if call in self._running:
                self._running.remove(call)
            call.end(error)

    # ---- the callers' side (gRPC threads) ----------------------------------------------

    def _submit(self, call: _Call) -> Iterator[Any]:
        self._arrivals.put(call)
        item: Any = None
        try:
            while (item := call.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if item is not _END and not isinstance(item, BaseException):
                call.abandoned.set()  # the caller stopped reading: it leaves at the next step
                while (rest := call.out.get()) is not _END and not isinstance(rest, BaseException):
                    pass  # ... and its cache is checked in before this returns

    def generate(
        self, request: GenerateRequest, should_stop: ShouldStop
    ) -> Iterator[TextChunk | Generated]:
        # planned here, in the caller's thread: EngineContextFull is raised at the call
        run = self.engine.plan_generate(request, should_stop)
        return self._submit(_Call(run))

    def prefill(self, request: GenerateRequest, should_stop: ShouldStop) -> Prefilled:
        run = self.engine.plan_prefill(request, should_stop)
        (done,) = list(self._submit(_Call(run)))
        assert isinstance(done, Prefilled)
        return done

    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int:
        return self.engine.count_tokens(messages, assistant_text)

    def drop(self, session: str) -> bool:
        return self.engine.drop(session)

    def cache_stats(self) -> CacheStats:
        return self.engine.cache_stats()
