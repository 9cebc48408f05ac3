"""What the servicer needs from a model engine, with no torch: the interface and its types.

`cloud.engine.TransformersEngine` implements it with torch + transformers; tests use a
scripted engine. The engine knows nothing of gRPC, auth, deltas or the takeover policy:
it turns (conversation, assistant text) into more text, re-using a per-session KV cache
for the longest common token prefix.

Two levels, one request type (`GenerateRequest`) between them:
  Engine      what the servicer calls: generate, prefill, count_tokens, drop. One
              implementation, `cloud.engine_thread.EngineThread`: the one scheduler.
  StepEngine  the model runner it schedules: a call is planned into a `Run` (in the
              caller's thread: tokenize, check the context window), started (its
              session's cache checked out, the common prefix kept), prefilled chunk by
              chunk, decoded one token per step *together with every other running call*
              (one batched forward), and finished (caches checked back in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared.wire import Message, Sampling, TextChunk, Usage


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    tokenizer: str
    context_length: int
    device: str
    dtype: str
    chat_template: bool
    max_running: int = 1  # the batch-size limit: calls decoded together in one step
    engine: str = "rows"  # the engine path: "rows" or "paged" (`serve --engine`)


@dataclass(frozen=True)
class Generated:
    """The end of one generate() call."""

    finish_reason: str  # shared.wire FINISH_* constants
    usage: Usage
    prefill_s: float
    decode_s: float
    text: str  # everything written in this call (the concatenation of the chunks)


@dataclass(frozen=True)
class Prefilled:
    usage: Usage
    prefill_s: float
    # a judged prefill (`GenerateRequest.probe`): the log-probability (nats) of each of the
    # probe's tokens after the text before it, in order
    probe_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class GenerateRequest:
    """One call from the servicer to the engine: continue `assistant_text` after
    `messages` in `session` (whose KV cache is reused for the longest common token
    prefix), writing up to `max_tokens` (a prefill writes none) with `sampling`, ending
    early at any of `stop`. A prefill with a `probe` brings the cache up to
    `assistant_text + probe` and scores the probe's tokens (`Prefilled.probe_logprobs`)."""

    session: str
    messages: tuple[Message, ...]
    assistant_text: str
    max_tokens: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    probe: str = ""


@dataclass(frozen=True)
class CacheStats:
    sessions: int
    bytes: int
    hits: int  # calls that re-used at least one cached token
    misses: int  # calls that found nothing to re-use
    evictions: int


ShouldStop = Callable[[], bool]


class EngineCancelled(Exception):
    """should_stop() said so between prefill chunks or decode steps."""


class EngineOutOfMemory(Exception):
    """A step ran out of device memory. The engine has freed what the step allocated and
    left every run as after its last completed step, so the same runs can go on, fewer at
    a time (`cloud.engine_thread` sheds the newest)."""


class EngineContextFull(Exception):
    """The prompt alone does not fit the model's context window."""


class Engine(Protocol):
    """What the servicer calls (`cloud.engine_thread.EngineThread` implements it)."""

    info: EngineInfo

    def generate(
        self, request: GenerateRequest, should_stop: ShouldStop
    ) -> Iterator[TextChunk | Generated]:
        """Continue `request.assistant_text` (rendered after its messages with the model's
        chat template, or as a plain prompt). Yields chunks as tokens decode, then one
        Generated. Raises EngineCancelled / EngineContextFull / EngineOutOfMemory."""
        ...

    def prefill(self, request: GenerateRequest, should_stop: ShouldStop) -> Prefilled:
        """Bring the session's KV cache up to the request's text without generating."""
        ...

    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int: ...

    def drop(self, session: str) -> bool:
        """Forget a session's cache; True if it existed."""
        ...

    def cache_stats(self) -> CacheStats: ...


class Run(Protocol):
    """One planned generate or prefill call, as the step loop sees it."""

    session: str
    should_stop: ShouldStop

    @property
    def prefilling(self) -> bool:
        """Prompt tokens are left to compute (started, not yet decoding)."""
        ...

    @property
    def done(self) -> bool:
        """Finished by itself: budget, EOS, stop string, context full, or prefill done."""
        ...

    def take(self) -> list[TextChunk]:
        """Chunks written since the last take()."""
        ...

    def outcome(self) -> Generated | Prefilled:
        """The result, once done."""
        ...


class StepEngine(Protocol):
    """A model runner: calls cut into steps, many at once (see the module doc). Only the
    engine loop (`cloud.engine_thread`) runs its steps."""

    info: EngineInfo

    def plan_generate(self, request: GenerateRequest, should_stop: ShouldStop) -> Run:
        """Tokenize and check; no model work. Raises EngineContextFull / ValueError."""
        ...

    def plan_prefill(self, request: GenerateRequest, should_stop: ShouldStop) -> Run: ...

    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int: ...

    def drop(self, session: str) -> bool: ...

    def cache_stats(self) -> CacheStats: ...

    def start(self, run: Run) -> None:
        """Check the session's cache out and keep the longest common prefix."""
        ...

    def prefill_step(self, runs: Sequence[Run], sharing: bool) -> None:
        """Compute one chunk of the first run's prompt, with chunks of others where they
        fit the step's budget (a small one when `sharing` the step with decoding runs);
        a generate run whose prompt is done samples its first token."""
        ...

    def decode_step(self, runs: Sequence[Run]) -> None:
        """One token for every run, in one batched forward. On an error every run's cache
        is left consistent (as after its last completed step) and the error is raised."""
        ...

    def finish(self, runs: Sequence[Run]) -> None:
        """Check the runs' caches back in (done, cancelled or failed alike)."""
        ...
