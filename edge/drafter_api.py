"""What the session loop needs from the small model, with no llama.cpp: the `Drafter`
interface and the `DraftToken`s it yields.

`edge.drafter.LlamaDrafter` implements it with llama.cpp; tests script it (tests/fakes.py).
It imports nothing of the edge: the loop (edge/session.py) and the small model both
depend on it, never on each other.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.wire import Message, Sampling


@dataclass(frozen=True)
class DraftToken:
    """One token written by the small model: its text (may be "" while a multi-byte
    character is incomplete), or the end of its writing (`finish` = "stop" at end of
    sequence, "context_full" when its context window is full)."""

    text: str
    finish: str | None = None
    entropy: float | None = None  # nats, of the distribution it was drawn from (if measured)


class Drafter(Protocol):
    def draft(
        self,
        messages: Sequence[Message],
        text: str,
        max_tokens: int,
        sampling: Sampling,
        *,
        uncertainty: bool = False,
    ) -> Generator[DraftToken, None, None]:
        """Continue the assistant `text` after `messages`; one item per token.

        `uncertainty`: also measure each token's entropy (the uncertainty trigger's probe).
        The caller may stop early by closing the iterator; the next call re-tokenizes."""
        ...
