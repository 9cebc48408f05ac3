"""The engine loop: every model call on one thread, chunks passed back in order."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from cloud.engine_api import (
    CacheStats,
    EngineCancelled,
    EngineInfo,
    Generated,
    Prefilled,
    ShouldStop,
)
from cloud.engine_thread import EngineThread
from shared.wire import FINISH_LENGTH, Message, Sampling, TextChunk, Usage


class CountingEngine:
    info = EngineInfo("fake", "fake/10", 100, "cpu", "float32", False)

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.steps = 0

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
        self.threads.add(threading.get_ident())
        if assistant_text == "boom":
            raise EngineCancelled("told to")
        for i in range(max_tokens):
            if should_stop():
                raise EngineCancelled("stopped")
            self.steps += 1
            yield TextChunk(str(i), 1)
        yield Generated(FINISH_LENGTH, Usage(1, 0, 1, max_tokens), 0.0, 0.0, "")

    def prefill(
        self,
        session: str,
        messages: Sequence[Message],
        assistant_text: str,
        should_stop: ShouldStop,
    ) -> Prefilled:
        self.threads.add(threading.get_ident())
        return Prefilled(Usage(3, 0, 3, 0), 0.0)

    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int:
        return 1

    def drop(self, session: str) -> bool:
        return True

    def cache_stats(self) -> CacheStats:
        return CacheStats(0, 0, 0, 0, 0)


def generate(loop: EngineThread, n: int, text: str = "") -> Iterator[TextChunk | Generated]:
    return loop.generate("s", [Message("user", "hi")], text, n, Sampling(), (), lambda: False)


def test_calls_from_many_threads_all_run_on_the_one_engine_thread():
    engine = CountingEngine()
    loop = EngineThread(engine)
    results: list[list[TextChunk | Generated]] = []
    workers = [
        threading.Thread(target=lambda: results.append(list(generate(loop, 3)))) for _ in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    loop.prefill("s", [Message("user", "hi")], "", lambda: False)
    assert len(engine.threads) == 1
    assert engine.threads != {threading.get_ident()}
    assert all([c.text for c in r[:-1]] == ["0", "1", "2"] for r in results)
    assert all(isinstance(r[-1], Generated) for r in results)
    loop.close()


def test_engine_errors_reach_the_caller():
    loop = EngineThread(CountingEngine())
    with pytest.raises(EngineCancelled):
        list(generate(loop, 3, text="boom"))
    loop.close()


def test_a_caller_that_stops_reading_stops_the_engine_at_its_next_step():
    engine = CountingEngine()
    loop = EngineThread(engine)
    stream = generate(loop, 10_000)
    next(stream)
    stream.close()  # e.g. the client cancelled; returns once the engine has stopped
    steps = engine.steps
    assert steps < 10_000
    assert list(generate(loop, 2))[-1].usage.generated_tokens == 2  # the loop goes on
    loop.close()
