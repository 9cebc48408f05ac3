"""The text side of cloud sessions: what each session holds, deltas, and one call at a time each.

A session is private to the API key that made it: the store is keyed by (key id,
session id), so one key can never name another's session. It holds the conversation
and the committed assistant text, which a delta must extend (checked by length and
SHA-256). KV caches live in the engine; this module imports no torch.

The commit happens before the final message is sent, so a stream can break after the
commit and before the caller learns of it. The caller then still holds the base it
named, so that base (`previous`) stays acceptable for one more call, next to the new
text: a delta against either resolves against the text it names.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from shared import errors
from shared.wire import FullText, Message, TextDelta, text_digest


@dataclass
class SessionText:
    messages: tuple[Message, ...]
    committed: str
    last_use: float
    turn: int = 0  # the number of the call whose turn it is to write (the latest)
    confirmed: bool = False  # a call committed text (a delta may extend it)
    # the base the last committing call started from (messages, text): its caller may
    # not have received the final message naming `committed`, so a delta may name this
    previous: tuple[tuple[Message, ...], str] | None = None
    cancel_turn: threading.Event = field(default_factory=threading.Event)


def engine_key(key_id: str, session_id: str) -> str:
    """The engine's cache key: the session id qualified by the caller's key."""
    return f"{key_id}/{session_id}"


class SessionStore:
    def __init__(
        self,
        max_sessions: int = 4096,
        ttl_s: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str], object] | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.clock = clock
        self.on_evict = on_evict or (lambda key: None)
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, SessionText] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, s in self._sessions.items() if now - s.last_use > self.ttl_s]:
            del self._sessions[key]
            self.on_evict(key)
        while len(self._sessions) > self.max_sessions:
            key, _ = self._sessions.popitem(last=False)
            self.on_evict(key)

    def resolve(self, key: str, text: FullText | TextDelta) -> tuple[tuple[Message, ...], str]:
        """The conversation and full assistant text a request means, or BaseMismatch."""
        with self._lock:
            self._expire()
            if isinstance(text, FullText):
                return text.messages, text.assistant_text
            held = self._sessions.get(key)
            if held is None or not held.confirmed:
                raise errors.BaseMismatch(
                    "the cloud holds no text for this session: send the full text"
                )
            named = (text.base_length, text.base_sha256)
            if text_digest(held.committed) == named:
                return held.messages, held.committed + text.append
            if held.previous is not None and text_digest(held.previous[1]) == named:
                messages, base = held.previous  # the last final message did not arrive
                return messages, base + text.append
            raise errors.BaseMismatch(
                "delta base does not match the session's text: send the full text"
            )

    def begin_write(self, key: str, messages: tuple[Message, ...]) -> tuple[int, threading.Event]:
        """Give the caller the session's turn to write; an older call in flight is superseded
        (its cancel event is set, and it stops at its next step without committing)."""
        with self._lock:
            held = self._sessions.get(key)
            if held is None:
                held = SessionText(messages, "", self.clock())
                self._sessions[key] = held
            else:
                held.cancel_turn.set()
                held.cancel_turn = threading.Event()
            held.turn += 1
            held.last_use = self.clock()
            self._sessions.move_to_end(key)
            return held.turn, held.cancel_turn

    def commit(
        self,
        key: str,
        turn: int,
        messages: tuple[Message, ...],
        text: str,
        base: str | None = None,
    ) -> bool:
        """Record the session's text, if it is still call `turn`'s turn. `base`: the held
        text the call's delta named (None for a full text); it stays acceptable as a
        delta base until the next commit, in case the caller never hears of this one."""
        with self._lock:
            held = self._sessions.get(key)
            if held is None or held.turn != turn:
                return False
            if base is not None:
                held.previous = (messages, base)
            elif held.confirmed:
                held.previous = (held.messages, held.committed)
            held.messages, held.committed, held.last_use = messages, text, self.clock()
            held.confirmed = True
            return True

    def drop(self, key: str) -> bool:
        """Forget a session (cancelling the call whose turn it is); True if it held committed text."""
        with self._lock:
            held = self._sessions.pop(key, None)
            if held is not None:
                held.cancel_turn.set()
            return held is not None and held.confirmed
