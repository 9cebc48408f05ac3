"""What a takeover writes at its end: no character and no half word lost (cloud.decoding).

A scripted byte tokenizer stands in for a byte-level BPE: ids below 256 are single bytes
(so an emoji or a CJK character can be split over tokens), ids from 256 are words.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from cloud.decoding import EXTRA_TOKENS, IncrementalDetokenizer, TextOutput, is_word_char
from shared.wire import (
    FINISH_CONTEXT_FULL,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_STOP_STRING,
    TextChunk,
)

HEL, LO, WORLD, HI, DOT = 256, 257, 258, 259, 260
EOS = 999
WORDS = {HEL: b" hel", LO: b"lo", WORLD: b" world", HI: b" hi", DOT: b"."}
EMOJI = list("🙂".encode())  # 4 byte tokens
SEA = list("海".encode())  # 3 byte tokens


class ByteTokenizer:
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        data = b"".join(bytes([i]) if i < 256 else WORDS.get(i, b"") for i in ids)
        return data.decode("utf-8", errors="replace")


def write(
    tokens: Sequence[int],
    max_tokens: int,
    stop: Sequence[str] = (),
    room: int = 100,
) -> tuple[TextOutput, list[TextChunk], int]:
    """Drive a writer as the engine does: sample (here: the next scripted token) while it
    wants one. Returns the writer, its chunks and how many tokens were sampled."""
    writer = TextOutput(
        IncrementalDetokenizer(ByteTokenizer(), [HI]),
        max_tokens=max_tokens,
        stop=stop,
        eos=frozenset({EOS}),
        room=room,
    )
    chunks: list[TextChunk] = []
    sampled = 0
    while writer.wants_token():
        writer.push(tokens[sampled])
        sampled += 1
        chunks += writer.take()
    chunks += writer.take()
    return writer, chunks, sampled


def test_a_character_split_over_tokens_at_the_budget_is_finished():
    w, chunks, _ = write([HI, *EMOJI, WORLD], max_tokens=2)  # the budget ends inside 🙂
    assert w.text == " hi🙂"
    assert w.finish == FINISH_LENGTH
    assert w.generated == 5  # 2 + the 3 bytes that finish the character, counted
    assert sum(c.tokens for c in chunks) == w.generated  # every counted token was written
    assert "".join(c.text for c in chunks) == w.text


def test_a_cjk_character_is_finished_and_then_the_call_ends():
    w, chunks, _ = write([*SEA, *SEA, *SEA], max_tokens=2)
    assert w.text == "海"  # finished with one more token; CJK needs no word extension
    assert w.generated == 3
    assert sum(c.tokens for c in chunks) == 3


def test_a_word_cut_at_the_budget_is_finished_and_the_next_word_is_not_written():
    w, chunks, sampled = write([HEL, LO, WORLD], max_tokens=1)
    assert w.text == " hello"
    assert w.generated == 2  # " world" was sampled to see the word end, never written
    assert sampled == 3
    assert w.finish == FINISH_LENGTH
    assert sum(c.tokens for c in chunks) == 2


def test_a_call_that_ends_between_words_writes_exactly_its_budget():
    w, _, sampled = write([HI, WORLD, DOT], max_tokens=2)
    assert (w.text, w.generated) == (" hi world", 2)
    assert sampled == 3  # one look at the next token: it starts a new word
    w, _, sampled = write([HI, DOT, WORLD], max_tokens=2)
    assert (w.text, w.generated, sampled) == (" hi.", 2, 2)  # ends on punctuation: no look


def test_the_extension_is_at_most_extra_tokens():
    w, _, _ = write([HEL] + [LO] * 20, max_tokens=1)
    assert w.generated == 1 + EXTRA_TOKENS
    assert w.finish == FINISH_LENGTH


def test_bytes_that_never_form_a_character_are_dropped_not_sent_as_replacement():
    w, chunks, _ = write([HI, 0xF0, 0xF0, 0xF0, 0xF0, 0xF0, 0xF0], max_tokens=2)
    assert w.text == " hi"
    assert "\ufffd" not in "".join(c.text for c in chunks)
    assert w.generated == 2 + EXTRA_TOKENS  # counted: they were generated
    w, _, _ = write([0xF0, HI, DOT], max_tokens=3)  # a stray byte inside the text
    assert w.text == " hi."


def test_end_of_sequence_finishes_with_stop_and_writes_what_was_held():
    w, _, _ = write([HI, EOS], max_tokens=5)
    assert (w.text, w.finish, w.generated) == (" hi", FINISH_STOP, 2)
    w, _, _ = write([*EMOJI[:2], EOS], max_tokens=5)
    assert (w.text, w.finish) == ("", FINISH_STOP)


def test_a_stop_string_is_kept_and_what_follows_it_is_cut():
    w, _, _ = write([HI, DOT, WORLD, WORLD], max_tokens=10, stop=("i.",))
    assert (w.text, w.finish) == (" hi.", FINISH_STOP_STRING)


def test_a_full_context_window_ends_the_call_even_inside_a_word():
    w, _, _ = write([HEL, LO, LO], max_tokens=10, room=1)
    assert (w.text, w.finish, w.generated) == (" hel", FINISH_CONTEXT_FULL, 1)


@pytest.mark.parametrize(
    ("char", "word"),
    [
        *[("a", True), ("Z", True), ("7", True), ("é", True), ("ж", True), ("한", True)],
        *[(" ", False), (".", False), ("-", False), ("'", False), ("\n", False)],
        *[("海", False), ("の", False), ("ก", False), ("🙂", False)],
    ],
)
def test_what_counts_as_inside_a_word(char, word):
    assert is_word_char(char) is word
