"""Run every call of an engine on one dedicated thread: the engine loop.

gRPC serves each request on whichever worker thread is free. torch's OpenMP pool belongs
to the thread that calls into it, so an engine called from many threads builds (and
keeps spinning) a pool per thread. Here one thread does all model work, as an engine
loop does in vLLM or TGI; request threads only pass chunks along. No torch is imported:
this wraps any `cloud.engine_api.Engine`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cloud.engine_api import CacheStats, Engine, Generated, Prefilled, ShouldStop
from shared.wire import Message, Sampling, TextChunk

_END = object()


class EngineThread:
    """An `Engine` whose generate/prefill run on one thread, in the order they arrive."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = engine.info
        self._jobs: queue.Queue[tuple[Callable[[], Iterator[Any]], queue.Queue[Any]] | None] = (
            queue.Queue()
        )
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, out = job
            try:
                for item in work():
                    out.put(item)
                out.put(_END)
            except BaseException as exc:  # handed to the caller's thread
                out.put(exc)

    def close(self) -> None:
        self._jobs.put(None)

    def _submit(
        self, work: Callable[[], Iterator[Any]], abandoned: threading.Event
    ) -> Iterator[Any]:
        out: queue.Queue[Any] = queue.Queue()
        self._jobs.put((work, out))
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if item is not _END and not isinstance(item, BaseException):
                abandoned.set()  # the caller stopped reading: stop at the next step ...
                while (rest := out.get()) is not _END and not isinstance(rest, BaseException):
                    pass  # ... and wait for it, so one call runs at a time

    def generate(
        self,
        session: str,
        messages: Sequence[Message],
        assistant_text: str,
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str],
        should_stop: ShouldStop,
    ) -> Iterator[TextChunk | Generated]:
        abandoned = threading.Event()

        def work() -> Iterator[TextChunk | Generated]:
            return self.engine.generate(
                session,
                messages,
                assistant_text,
                max_tokens,
                sampling,
                stop,
                lambda: abandoned.is_set() or should_stop(),
            )

        return self._submit(work, abandoned)

    def prefill(
        self,
        session: str,
        messages: Sequence[Message],
        assistant_text: str,
        should_stop: ShouldStop,
    ) -> Prefilled:
        abandoned = threading.Event()

        def work() -> Iterator[Prefilled]:
            yield self.engine.prefill(session, messages, assistant_text, should_stop)

        (done,) = list(self._submit(work, abandoned))
        return done  # type: ignore[no-any-return]

    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int:
        return self.engine.count_tokens(messages, assistant_text)

    def drop(self, session: str) -> bool:
        return self.engine.drop(session)

    def cache_stats(self) -> CacheStats:
        return self.engine.cache_stats()
