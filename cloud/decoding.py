"""From sampled token ids to the text a takeover writes, and when it ends. No torch here.

The engine samples; this module decides what those tokens *say* and whether the call
goes on. One `TextOutput` per generate call, fed one sampled id at a time:

  stream    an incremental detokenizer turns ids into text, holding back a character
            whose UTF-8 bytes are split over tokens until it is complete
  stop      EOS (the answer is complete), a stop string (kept, the rest cut), the
            token budget, or a full context window
  finish    nothing written is lost at the end of the budget: a character still held
            back is finished with a few more tokens, and a word cut in half is finished
            too (the edge re-tokenizes half a word badly), at most `extra` tokens past
            `max_tokens`, all counted in usage. A character that never completes is
            written without its stray bytes: the cloud never sends U+FFFD.

The budget rule, written where it is applied (`wants_token`): below `max_tokens`, go
on; at or past it, go on only while a character is held back or the text ends inside a
word, and never past `max_tokens + extra`. Whether the word goes on is known only from
the next token, so that token is sampled and *peeked*: a token that starts a new word
(or a space, punctuation, a newline) ends the call without being written or counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.wire import (
    FINISH_CONTEXT_FULL,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_STOP_STRING,
    TextChunk,
)

REPLACEMENT = "\ufffd"
# Tokens a call may run past max_tokens to finish a character or a word. A UTF-8
# character is at most 4 bytes, so 3 more byte tokens always complete one the model
# is writing; one more covers a word's last piece.
EXTRA_TOKENS = 4


class IncrementalDetokenizer:
    """Token ids in, text out, as TGI and vLLM do it: decode a short window before and
    after the newest token and emit the difference, so SentencePiece leading spaces and
    multi-byte characters split over tokens come out right. Text ending in U+FFFD (an
    incomplete character) is held back until the next token completes it."""

    def __init__(self, tokenizer: Any, context: Sequence[int]):
        self._tok = tokenizer
        self.ids = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))

    def _new_text(self, ids: Sequence[int]) -> tuple[str, str]:
        prefix_text = self._decode(ids[self.prefix_offset : self.read_offset])
        return prefix_text, self._decode(ids[self.prefix_offset :])

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text, new_text = self._new_text(self.ids)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def peek(self, token: int) -> str:
        """What add(token) would return, without adding it."""
        prefix_text, new_text = self._new_text([*self.ids, token])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            return new_text[len(prefix_text) :]
        return ""

    @property
    def holding(self) -> int:
        """Tokens added whose text has not been returned yet (an incomplete character)."""
        return len(self.ids) - self.read_offset

    def flush(self) -> str:
        """The text of the held tokens as far as it goes, without the bytes that form no
        character; afterwards nothing is held."""
        if not self.holding:
            return ""
        prefix_text, new_text = self._new_text(self.ids)
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :].replace(REPLACEMENT, "")


def find_stop(text: str, stop: Sequence[str], start: int) -> int | None:
    """The end (exclusive) of the earliest stop string in text[start:], or None."""
    best: int | None = None
    for s in stop:
        if not s:
            continue
        i = text.find(s, start)
        if i >= 0 and (best is None or i + len(s) < best):
            best = i + len(s)
    return best


def _unspaced(c: str) -> bool:
    """Scripts written without spaces between words (CJK, kana, Thai): every character
    is a fine place to stop."""
    o = ord(c)
    return (
        0x0E00 <= o <= 0x0EFF  # Thai, Lao
        or 0x2E80 <= o <= 0x9FFF  # CJK radicals, kana, ideographs
        or 0xF900 <= o <= 0xFAFF  # CJK compatibility ideographs
        or 0xFF61 <= o <= 0xFF9F  # half-width katakana
        or o >= 0x20000  # CJK extensions
    )


def is_word_char(c: str) -> bool:
    """A letter or digit inside a space-separated word."""
    return c.isalnum() and not _unspaced(c)


class TextOutput:
    """One generate call's text: sampled ids in (`push`), chunks out (`take`), and the
    rule for when it ends (`wants_token`). `finish` is None until it has ended."""

    def __init__(
        self,
        detokenizer: IncrementalDetokenizer,
        *,
        max_tokens: int,
        stop: Sequence[str],
        eos: frozenset[int],
        room: int,
        extra: int = EXTRA_TOKENS,
    ) -> None:
        self.detok = detokenizer
        self.max_tokens = max_tokens
        self.stop = tuple(stop)
        self.eos = eos
        self.room = room  # tokens the context window has left for this call
        self.extra = extra
        self.text = ""  # written so far
        self.generated = 0  # tokens counted in usage (written ones, and an EOS)
        self.finish: str | None = None
        self._held = 0  # tokens counted but not yet in a chunk
        self._peeking = False
        self._chunks: list[TextChunk] = []
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    # ---- the rule ----------------------------------------------------------------

    def wants_token(self) -> bool:
        """Whether to sample another token; when not, `finish` says why."""
        if self.finish is not None:
            return False
        if self.generated >= self.room:
            return self._end(FINISH_CONTEXT_FULL)
        if self.generated < self.max_tokens:
            return True
        # At or past the budget: finish a held-back character or a half-written word.
        if self.generated >= self.max_tokens + self.extra:
            return self._end(FINISH_LENGTH)
        if self.detok.holding:
            return True
        if self.text and is_word_char(self.text[-1]):
            self._peeking = True  # does the next token go on with this word?
            return True
        return self._end(FINISH_LENGTH)

    def push(self, token: int) -> None:
        """One sampled token (only after wants_token() said so)."""
        if self._peeking:
            self._peeking = False
            piece = self.detok.peek(token)
            if token not in self.eos and not (piece and is_word_char(piece[0])):
                self._end(FINISH_LENGTH)  # a new word starts: not written, not counted
                return
        self.generated += 1
        if token in self.eos:  # the answer is complete; EOS writes no text
            self._end(FINISH_STOP)
            return
        self._held += 1
        self._write(self.detok.add(token))

    def take(self) -> list[TextChunk]:
        """The chunks written since the last take()."""
        chunks, self._chunks = self._chunks, []
        return chunks

    # ---- writing -----------------------------------------------------------------

    def _write(self, piece: str) -> None:
        piece = piece.replace(REPLACEMENT, "")  # bytes that form no character
        if not piece:
            return
        start = max(0, len(self.text) - self._longest_stop + 1)
        end = find_stop(self.text + piece, self.stop, start)
        if end is not None:  # keep the stop string, cut what follows it
            piece = (self.text + piece)[len(self.text) : end]
        if piece:
            self.text += piece
            self._chunks.append(TextChunk(piece, self._held))
            self._held = 0
        if end is not None:
            self.finish = FINISH_STOP_STRING

    def _end(self, reason: str) -> bool:
        """Finish with `reason`, writing what held-back tokens say (no stray bytes)."""
        if self.detok.holding:
            self._write(self.detok.flush())
        if self.finish is None:  # a stop string in the flushed text wins
            self.finish = reason
        return False
