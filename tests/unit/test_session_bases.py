"""Which delta bases a session accepts (cloud.sessions): the committed text, and the base
the last committing call started from, since its caller may never have received the
final message that named the new text."""

from __future__ import annotations

import pytest

from cloud.sessions import SessionStore
from shared import errors
from shared.wire import FullText, Message, TextDelta, text_digest

MSGS = (Message("user", "q"),)


def delta(base: str, append: str = "") -> TextDelta:
    length, digest = text_digest(base)
    return TextDelta(length, digest, append)


def takeover(store: SessionStore, body: FullText | TextDelta, written: str) -> str:
    """One successful call as the servicer makes it: resolve, write, commit."""
    messages, text = store.resolve("k", body)
    turn, _ = store.begin_write("k", messages)
    base = text[: len(text) - len(body.append)] if isinstance(body, TextDelta) else None
    assert store.commit("k", turn, messages, text + written, base)
    return text + written


def accepts(store: SessionStore, base: str) -> bool:
    try:
        store.resolve("k", delta(base))
    except errors.BaseMismatch:
        return False
    return True


def test_after_a_commit_both_the_named_base_and_the_new_text_are_accepted() -> None:
    store = SessionStore()
    a = takeover(store, FullText(MSGS, "A"), "1")
    b = takeover(store, delta(a, "+"), "2")
    assert accepts(store, a) and accepts(store, b)
    assert store.resolve("k", delta(a, "x")) == (MSGS, a + "x")


def test_once_a_call_names_the_new_text_the_older_base_is_refused() -> None:
    store = SessionStore()
    a = takeover(store, FullText(MSGS, "A"), "1")
    b = takeover(store, delta(a), "2")
    c = takeover(store, delta(b), "3")  # its caller had received b's final message
    assert not accepts(store, a)
    assert accepts(store, b) and accepts(store, c)


def test_lost_final_messages_in_a_row_keep_the_callers_base() -> None:
    store = SessionStore()
    a = takeover(store, FullText(MSGS, "A"), "1")
    takeover(store, delta(a, "+"), "2")  # final message lost: the caller still holds a
    c = takeover(store, delta(a, "-"), "3")  # and again
    assert accepts(store, a) and accepts(store, c)


def test_a_partial_text_is_never_a_base() -> None:
    store = SessionStore()
    a = takeover(store, FullText(MSGS, "A"), "1")
    takeover(store, delta(a), "234")
    with pytest.raises(errors.BaseMismatch):
        store.resolve("k", delta(a + "23"))


def test_an_uncommitted_call_leaves_the_bases_as_they_were() -> None:
    store = SessionStore()
    a = takeover(store, FullText(MSGS, "A"), "1")
    messages, _text = store.resolve("k", delta(a, "x"))
    store.begin_write("k", messages)  # superseded or broken: never commits
    assert accepts(store, a)
    assert not accepts(store, a + "x")
