"""The engine loop: every model step on one thread, many calls decoded together.

A scripted StepEngine records what each step did (which calls a decode step held, which
call a prefill chunk was for), so the tests read the schedule, not the clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from cloud.engine_api import (
    CacheStats,
    EngineCancelled,
    EngineContextFull,
    EngineInfo,
    EngineOutOfMemory,
    Generated,
    GenerateRequest,
    Prefilled,
    Run,
    ShouldStop,
)
from cloud.engine_thread import EngineThread
from shared.wire import FINISH_LENGTH, Message, Sampling, TextChunk, Usage

CHUNK = 4  # prompt tokens per prefill chunk


class ScriptedRun:
    def __init__(self, session: str, prompt: int, max_tokens: int | None, should_stop: ShouldStop):
        self.session = session
        self.should_stop = should_stop
        self.prompt = prompt
        self.left = prompt  # prompt tokens not yet prefilled
        self.max_tokens = max_tokens  # None: a prefill call
        self.started = False
        self.written = 0
        self.chunks: list[TextChunk] = []

    @property
    def prefilling(self) -> bool:
        return self.started and self.left > 0

    @property
    def done(self) -> bool:
        if not self.started or self.prefilling:
            return False
        return self.max_tokens is None or self.written >= self.max_tokens

    def take(self) -> list[TextChunk]:
        chunks, self.chunks = self.chunks, []
        return chunks

    def outcome(self) -> Generated | Prefilled:
        usage = Usage(self.prompt, 0, self.prompt, self.written)
        if self.max_tokens is None:
            return Prefilled(usage, 0.0)
        return Generated(
            FINISH_LENGTH, usage, 0.0, 0.0, "".join(str(i) for i in range(self.written))
        )


class ScriptedStepEngine:
    """Records the schedule: ("prefill", session), ("decode", (sessions...)), ..."""

    def __init__(self, max_running: int = 8) -> None:
        self.info = EngineInfo("fake", "fake", 1000, "cpu", "float32", False, max_running)
        self.threads: set[int] = set()
        self.log: list[tuple[str, object]] = []
        self.gate = threading.Event()  # the first step waits for it: calls pile up first
        self.gate.set()
        self.fail_decode_of: str | None = None
        self.finished: list[str] = []

    def plan_generate(self, request: GenerateRequest, should_stop: ShouldStop) -> ScriptedRun:
        text = request.assistant_text
        if text == "too long":
            raise EngineContextFull("too long")
        return ScriptedRun(request.session, max(1, len(text)), request.max_tokens, should_stop)

    def plan_prefill(self, request: GenerateRequest, should_stop: ShouldStop) -> ScriptedRun:
        return ScriptedRun(request.session, max(1, len(request.assistant_text)), None, should_stop)

    def start(self, run: Run) -> None:
        assert isinstance(run, ScriptedRun)
        self.gate.wait()
        self.threads.add(threading.get_ident())
        run.started = True
        self.log.append(("start", run.session))

    def prefill_step(self, runs: Sequence[Run], sharing: bool) -> None:
        run = runs[0]  # one chunk of the oldest call per step
        assert isinstance(run, ScriptedRun)
        run.left = max(0, run.left - CHUNK)
        self.log.append(("prefill", run.session))

    def decode_step(self, runs: Sequence[Run]) -> None:
        self.threads.add(threading.get_ident())
        sessions = tuple(r.session for r in runs)
        self.log.append(("decode", sessions))
        if self.fail_decode_of in sessions:
            raise RuntimeError("the model broke")
        for r in runs:
            assert isinstance(r, ScriptedRun)
            r.chunks.append(TextChunk(str(r.written), 1))
            r.written += 1

    def finish(self, runs: Sequence[Run]) -> None:
        self.finished.extend(r.session for r in runs)
        self.log.append(("finish", tuple(r.session for r in runs)))

    # the rest of the StepEngine protocol
    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int:
        return len(assistant_text)

    def drop(self, session: str) -> bool:
        return True

    def cache_stats(self) -> CacheStats:
        return CacheStats(0, 0, 0, 0, 0)

    def decode_steps(self) -> list[tuple[str, ...]]:
        return [s for kind, s in self.log if kind == "decode"]  # type: ignore[misc]


def generate(
    loop: EngineThread,
    session: str,
    n: int,
    text: str = "x",
    should_stop: ShouldStop = lambda: False,
) -> Iterator[TextChunk | Generated]:
    request = GenerateRequest(session, (Message("user", "hi"),), text, n, Sampling())
    return loop.generate(request, should_stop)


def run_concurrently(loop: EngineThread, calls: dict[str, tuple[int, str]]) -> dict[str, object]:
    """Each call from its own thread; returns each session's events, or its exception."""
    results: dict[str, object] = {}

    def one(session: str, n: int, text: str) -> None:
        try:
            results[session] = list(generate(loop, session, n, text))
        except Exception as exc:
            results[session] = exc

    threads = [threading.Thread(target=one, args=(s, n, t)) for s, (n, t) in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.fixture()
def engine() -> Iterator[ScriptedStepEngine]:
    yield ScriptedStepEngine()


def wait_queued(loop: EngineThread, n: int) -> None:
    """Until the loop is held in the first call's start and the other n - 1 are queued."""
    while loop._arrivals.qsize() + len(loop._waiting) < n - 1:
        threading.Event().wait(0.005)
    threading.Event().wait(0.05)


def held_back(
    engine: ScriptedStepEngine, loop: EngineThread, calls: dict[str, tuple[int, str]]
) -> dict[str, object]:
    """Run `calls` with the first step held until all of them are queued."""
    engine.gate.clear()
    box: dict[str, dict[str, object]] = {}
    runner = threading.Thread(target=lambda: box.setdefault("r", run_concurrently(loop, calls)))
    runner.start()
    wait_queued(loop, len(calls))
    engine.gate.set()
    runner.join(timeout=30)
    return box["r"]


# ---- batching ---------------------------------------------------------------------------


def test_calls_running_at_once_decode_together_in_one_step(engine):
    loop = EngineThread(engine)
    results = held_back(engine, loop, {f"s{i}": (10, "x") for i in range(4)})
    for events in results.values():
        assert isinstance(events, list)
        assert [c.text for c in events[:-1]] == [str(i) for i in range(10)]
        assert isinstance(events[-1], Generated)
    steps = engine.decode_steps()
    assert max(len(s) for s in steps) == 4
    assert len(steps) < 4 * 10  # one step writes a token for each running call
    assert loop.batch_sizes[4] >= 1 and loop.steps == len(steps)
    loop.close()


def test_the_batch_never_holds_more_than_max_running(engine):
    loop = EngineThread(engine, max_running=2)
    results = held_back(engine, loop, {f"s{i}": (3, "x") for i in range(5)})
    assert all(isinstance(r, list) and isinstance(r[-1], Generated) for r in results.values())
    assert max(len(s) for s in engine.decode_steps()) == 2
    loop.close()


def test_a_new_call_joins_between_steps_without_waiting_for_the_others(engine):
    loop = EngineThread(engine)
    long = generate(loop, "long", 100_000)  # far more than the test lets it write
    next(long)  # "long" is decoding
    events = list(generate(loop, "short", 3))  # finishes while "long" still runs
    assert isinstance(events[-1], Generated)
    joined = [s for s in engine.decode_steps() if "short" in s]
    assert all("long" in s for s in joined)
    long.close()
    loop.close()


def test_a_long_prefill_delays_running_decodes_by_one_chunk_per_step(engine):
    loop = EngineThread(engine)
    long = generate(loop, "decoding", 100_000)  # still decoding when the reader is done
    next(long)
    list(generate(loop, "reader", 2, text="p" * (CHUNK * 10)))  # 10 chunks of prompt
    after = engine.log[engine.log.index(("start", "reader")) :]
    chunks_between_decodes = 0
    for kind, _ in after:
        if kind == "prefill":
            chunks_between_decodes += 1
            assert chunks_between_decodes <= 1
        elif kind == "decode":
            chunks_between_decodes = 0
    assert sum(1 for e in after if e == ("prefill", "reader")) == 10
    long.close()
    loop.close()


def test_calls_on_one_session_run_one_after_the_other(engine):
    loop = EngineThread(engine)
    engine.gate.clear()
    threads = [threading.Thread(target=lambda: list(generate(loop, "dup", 5))) for _ in range(2)]
    for t in threads:
        t.start()
    wait_queued(loop, 2)
    engine.gate.set()
    for t in threads:
        t.join(30)
    assert all(s.count("dup") <= 1 for s in engine.decode_steps())
    starts = [i for i, e in enumerate(engine.log) if e == ("start", "dup")]
    ends = [i for i, e in enumerate(engine.log) if e[0] == "finish" and "dup" in e[1]]  # type: ignore[operator]
    assert len(starts) == 2 and starts[0] < ends[0] < starts[1]
    loop.close()


# ---- per call: cancellation, errors, what reaches the caller ------------------------------


def test_a_cancelled_call_leaves_at_the_next_step_and_the_others_go_on(engine):
    loop = EngineThread(engine)
    stop = threading.Event()
    # far more tokens than the engine can write before stop is set a few lines on
    cancelled = generate(loop, "cancelled", 100_000, should_stop=stop.is_set)
    next(cancelled)
    other = generate(loop, "other", 20)
    next(other)
    stop.set()
    with pytest.raises(EngineCancelled):
        list(cancelled)
    rest = list(other)
    assert isinstance(rest[-1], Generated) and rest[-1].usage.generated_tokens == 20
    assert "cancelled" in engine.finished
    loop.close()


def test_a_caller_that_stops_reading_stops_its_call_at_the_next_step(engine):
    loop = EngineThread(engine)
    stream = generate(loop, "s", 10_000)
    next(stream)
    stream.close()  # e.g. the client cancelled; returns once its cache is checked in
    assert "s" in engine.finished
    assert len(engine.decode_steps()) < 10_000
    assert list(generate(loop, "s", 2))[-1].usage.generated_tokens == 2  # the loop goes on
    loop.close()


def test_a_failed_step_fails_the_calls_in_it_and_the_loop_goes_on(engine):
    loop = EngineThread(engine)
    engine.fail_decode_of = "broken"
    with pytest.raises(RuntimeError, match="the model broke"):
        list(generate(loop, "broken", 3))
    assert "broken" in engine.finished
    engine.fail_decode_of = None
    assert list(generate(loop, "next", 2))[-1].usage.generated_tokens == 2
    loop.close()


def test_a_prompt_too_long_is_refused_at_the_call_in_the_callers_thread(engine):
    loop = EngineThread(engine)
    with pytest.raises(EngineContextFull):
        generate(loop, "s", 3, text="too long")
    assert engine.log == []
    loop.close()


def test_prefill_calls_run_in_the_loop_and_return_their_usage(engine):
    loop = EngineThread(engine)
    done = loop.prefill(GenerateRequest("s", (Message("user", "hi"),), "p" * 9), lambda: False)
    assert done.usage.prompt_tokens == 9
    assert [e for e in engine.log if e[0] == "prefill"] == [("prefill", "s")] * 3
    loop.close()


def test_every_model_step_runs_on_the_one_engine_thread(engine):
    loop = EngineThread(engine)
    run_concurrently(loop, {f"s{i}": (3, "x") for i in range(4)})
    loop.prefill(GenerateRequest("p", (Message("user", "hi"),), "x"), lambda: False)
    assert len(engine.threads) == 1
    assert engine.threads != {threading.get_ident()}
    loop.close()


def test_step_observers_see_each_decode_steps_batch_size(engine):
    loop = EngineThread(engine)
    seen: list[int] = []
    loop.add_step_observer(seen.append)
    held_back(engine, loop, {"a": (5, "x"), "b": (5, "x")})
    assert seen == [len(s) for s in engine.decode_steps()]
    assert 2 in seen
    loop.close()


# ---- out of device memory ---------------------------------------------------------------


class OutOfMemoryAbove(ScriptedStepEngine):
    """A device that holds at most `fits` decoding rows: a larger step raises
    EngineOutOfMemory (after which, like the real engines, every run is as before)."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits
        self.ooms = 0

    def decode_step(self, runs: Sequence[Run]) -> None:
        if len(runs) > self.fits:
            self.ooms += 1
            self.log.append(("oom", tuple(r.session for r in runs)))
            raise EngineOutOfMemory(f"{len(runs)} rows do not fit")
        super().decode_step(runs)


def test_an_out_of_memory_step_sheds_the_newest_calls_and_every_call_completes():
    engine = OutOfMemoryAbove(fits=3)
    loop = EngineThread(engine)
    sheds: list[int] = []
    loop.add_shed_observer(sheds.append)  # what the metrics see
    results = held_back(engine, loop, {f"s{i}": (12, "x") for i in range(8)})
    for session, events in results.items():
        assert isinstance(events, list), (session, events)  # nobody failed
        assert [c.text for c in events[:-1]] == [str(i) for i in range(12)]
        assert isinstance(events[-1], Generated)
    assert engine.ooms >= 1 and loop.sheds == engine.ooms == len(sheds)
    assert all(1 <= left <= 4 for left in sheds)
    steps = engine.decode_steps()
    assert max(len(s) for s in steps) <= 3  # every step that ran fitted
    first_oom = next(i for i, entry in enumerate(engine.log) if entry[0] == "oom")
    after = [s for kind, s in engine.log[first_oom + 1 :] if kind == "decode"]
    assert after and set(after[0]) <= set(engine.log[first_oom][1][:4])  # the oldest went on
    loop.close()


def test_a_call_that_runs_out_of_memory_alone_fails_with_that_error():
    engine = OutOfMemoryAbove(fits=0)
    loop = EngineThread(engine)
    with pytest.raises(EngineOutOfMemory):
        list(generate(loop, "alone", 3))
    assert engine.finished == ["alone"]  # its cache was checked in
    loop.close()
