"""What the servicer needs from a model engine, with no torch: the interface and its types.

`cloud.engine.TransformersEngine` implements it with torch + transformers; tests use a
scripted engine. The engine knows nothing of gRPC, auth, deltas or the takeover policy:
it turns (conversation, assistant text) into more text, re-using a per-session KV cache
for the longest common token prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


class EngineContextFull(Exception):
    """The prompt alone does not fit the model's context window."""


class Engine(Protocol):
    info: EngineInfo

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
        """Continue `assistant_text` (rendered after `messages` with the model's chat
        template, or as a plain prompt). Yields chunks as tokens decode, then one
        Generated. Raises EngineCancelled / EngineContextFull."""
        ...

    def prefill(
        self,
        session: str,
        messages: Sequence[Message],
        assistant_text: str,
        should_stop: ShouldStop,
    ) -> Prefilled:
        """Bring the session's KV cache up to this text without generating."""
        ...

    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int: ...

    def drop(self, session: str) -> bool:
        """Forget a session's cache; True if it existed."""
        ...

    def cache_stats(self) -> CacheStats: ...
