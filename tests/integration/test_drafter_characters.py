"""The llama.cpp drafter never loses a character at its token budget: a character whose
bytes span several tokens (emoji, CJK in a byte-level vocabulary) and that the budget cuts
is finished with a few more tokens, counted as written, rather than dropped.

Real SmolLM2-135M (its vocabulary splits 🥐 into three byte tokens), greedy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from edge.drafter import LlamaDrafter
from shared.wire import Message, Sampling

pytestmark = pytest.mark.real_models

GREEDY = Sampling(temperature=0.0)
MESSAGES = [Message("user", "Repeat exactly, ten times: 你好世界🍞🥐")]


@pytest.fixture(scope="module")
def drafter(smollm2: Path) -> LlamaDrafter:
    return LlamaDrafter(smollm2, context_length=1024, threads=1, seed=1)


class TokenBytes:
    """Records the bytes of every token the drafter detokenizes (what the model wrote)."""

    def __init__(self, drafter: LlamaDrafter) -> None:
        self.pieces: list[bytes] = []
        self._inner = drafter.llm.detokenize

        def record(tokens: Sequence[int], *args: Any, **kwargs: Any) -> bytes:
            data: bytes = self._inner(tokens, *args, **kwargs)
            self.pieces.append(data)
            return data

        drafter.llm.detokenize = record

    def restore(self, drafter: LlamaDrafter) -> None:
        drafter.llm.detokenize = self._inner


@pytest.mark.parametrize("budget", [1, 2])
def test_a_character_cut_by_the_budget_is_finished_not_dropped(
    drafter: LlamaDrafter, budget: int
) -> None:
    written = TokenBytes(drafter)
    before = drafter.counters.finishing_tokens
    try:
        tokens = list(drafter.draft(MESSAGES, "你好世界🍞", budget, GREEDY))
    finally:
        written.restore(drafter)
    text = "".join(t.text for t in tokens)
    assert text.encode("utf-8") == b"".join(written.pieces), "every byte written is in the text"
    assert "\ufffd" not in text
    assert len(tokens) == len(written.pieces), "each token is counted, the extra ones too"
    finished = drafter.counters.finishing_tokens - before
    assert finished > 0, "the budget fell inside a character here (the path under test)"
    assert len(tokens) == budget + finished <= budget + 4


def test_short_drafts_in_a_row_lose_no_character(drafter: LlamaDrafter) -> None:
    """Like an edge writing a few tokens between 3-token takeovers: the text re-tokenized
    after each short draft still holds every character."""
    text = "你好世界🍞"
    for _ in range(6):
        written = TokenBytes(drafter)
        try:
            piece = "".join(t.text for t in drafter.draft(MESSAGES, text, 1, GREEDY))
        finally:
            written.restore(drafter)
        assert piece.encode("utf-8") == b"".join(written.pieces)
        text += piece
    assert "\ufffd" not in text and text.startswith("你好世界🍞🥐")
