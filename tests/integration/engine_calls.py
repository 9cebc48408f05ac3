"""Calls on a real engine as the server makes them: through its engine loop.

`cloud.engine_thread.EngineThread` is the one scheduler; a test that wants one call of an
engine (a `StepEngine`) gets the loop that serves that engine object, started once and
kept for the test session."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from cloud.engine_api import Generated, GenerateRequest, Prefilled, ShouldStop
from cloud.engine_thread import EngineThread
from shared.wire import Message, Sampling, TextChunk

GREEDY = Sampling(temperature=0.0)
_LOOPS: dict[int, tuple[Any, EngineThread]] = {}


def loop_of(engine: Any) -> EngineThread:
    """The engine loop serving `engine` (an EngineThread is its own loop)."""
    if isinstance(engine, EngineThread):
        return engine
    held = _LOOPS.get(id(engine))
    if held is None or held[0] is not engine:
        held = (engine, EngineThread(engine))
        _LOOPS[id(engine)] = held
    return held[1]


def generate(
    engine: Any,
    session: str,
    messages: Sequence[Message],
    text: str,
    n: int,
    sampling: Sampling = GREEDY,
    stop: Sequence[str] = (),
    should_stop: ShouldStop = lambda: False,
) -> Iterator[TextChunk | Generated]:
    request = GenerateRequest(session, tuple(messages), text, n, sampling, tuple(stop))
    return loop_of(engine).generate(request, should_stop)


def prefill(
    engine: Any,
    session: str,
    messages: Sequence[Message],
    text: str,
    should_stop: ShouldStop = lambda: False,
) -> Prefilled:
    return loop_of(engine).prefill(GenerateRequest(session, tuple(messages), text), should_stop)


def release(engine: Any) -> None:
    """Stop the loop serving `engine` and let both go (an engine the test is done with)."""
    held = _LOOPS.pop(id(engine), None)
    if held is not None:
        held[1].close()


def like(engine: Any, cls: Any = None, model: Any = None, **options: Any) -> Any:
    """Another engine on `engine`'s model object (the weights shared, not reloaded): of
    `engine`'s class unless `cls` says, around `model` if given (e.g. a wrapper that
    injects faults), with its own `options` (prefill_chunk, max_cache_bytes, ...)."""
    return (cls or type(engine))(
        model if model is not None else engine.model,
        engine.tokenizer,
        model_id="smol",
        device=engine.device,
        loaded_from=engine.loaded_from,
        **options,
    )
