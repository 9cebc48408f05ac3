"""The cloud side of a session: each takeover sent as a delta against the text the cloud
confirmed, and the edge's new text pushed ahead in the background (the Prefill RPC).

The cloud gets a delta against the text it confirmed, or the full text when it holds
nothing (or something else: it answers FAILED_PRECONDITION, and the call goes again with
the full text, before any of its output was received). A prefill still in flight is waited
for, a bounded wait, before the next takeover (one writer per session). It knows the
`CloudTransport` interface only (edge/cloud_client.py implements it over gRPC; tests script
it), never the session loop, the small model or the policy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

from shared import errors
from shared.wire import (
    FullText,
    JudgeSpec,
    JudgeVerdict,
    Message,
    Sampling,
    TakeoverCall,
    TakeoverDone,
    TextChunk,
    TextDelta,
    WriteSpec,
    text_digest,
)


class CloudTransport(Protocol):
    def takeover(self, call: TakeoverCall) -> Iterator[TextChunk | JudgeVerdict | TakeoverDone]:
        """One streaming takeover. Raises shared.errors.SpecThinkError subclasses."""
        ...

    def prefill(self, session_id: str, text: FullText | TextDelta) -> tuple[int, str]:
        """Push text without generating; returns the committed (length, sha256)."""
        ...


class CloudSession:
    """Builds each call as a delta against the text the cloud confirmed, or as full text.

    A delta the cloud cannot apply (restart, eviction, another replica) is answered with
    FAILED_PRECONDITION; the call is then sent again with the full text, before any of its
    output was received, so a cloud restart costs time and never text."""

    def __init__(
        self, transport: CloudTransport, session_id: str, prefill_wait_s: float = 2.0
    ) -> None:
        self.transport = transport
        self.session_id = session_id
        self._base: str | None = None  # the assistant text the cloud confirmed holding
        self._messages: tuple[Message, ...] | None = None
        self.full_text_resends = 0
        self.calls = 0
        self.prefills = 0
        self.prefills_abandoned = 0
        # how long a takeover waits for a background prefill still in flight: past it the
        # takeover goes without it (it supersedes the prefill on the cloud and finds the
        # chunks already computed in the cache); waiting longer only delays the answer
        self.prefill_wait_s = prefill_wait_s
        self._prefill: threading.Thread | None = None
        self._epoch = 0  # bumped when a prefill is abandoned: its late result is ignored
        self._lock = threading.Lock()

    def forget(self) -> None:
        self._join_prefill()
        self._base = None

    def prefill_async(self, messages: Sequence[Message], text: str) -> bool:
        """Push `text` to the cloud in the background so that its KV cache is warm before
        the next takeover (which waits for it first: one writer per session). Skipped
        while one is in flight. Failures only cost the warm cache."""
        if self._prefill is not None and self._prefill.is_alive():
            return False
        msgs = tuple(messages)
        body = self._text(msgs, text)
        if isinstance(body, TextDelta) and not body.append:
            return False

        epoch = self._epoch

        def push() -> None:
            try:
                committed: tuple[int, str] | None = self.transport.prefill(self.session_id, body)
            except errors.SpecThinkError:
                committed = None
            with self._lock:
                if epoch != self._epoch:
                    return  # abandoned: a takeover went ahead without it
                ok = committed is not None and committed == text_digest(text)
                self._base = text if ok else None
                self._messages = msgs

        self.prefills += 1
        self._prefill = threading.Thread(target=push, name="prefill-ahead", daemon=True)
        self._prefill.start()
        return True

    def _join_prefill(self) -> None:
        """Wait for a prefill in flight, at most `prefill_wait_s`; a slower one is abandoned,
        and the next call sends the full text (the cloud may or may not hold the prefill)."""
        if self._prefill is None:
            return
        self._prefill.join(self.prefill_wait_s)
        if self._prefill.is_alive():
            with self._lock:
                self._epoch += 1
                self._base = None
            self.prefills_abandoned += 1
        self._prefill = None

    def _text(self, messages: tuple[Message, ...], text: str) -> FullText | TextDelta:
        if self._base is not None and self._messages == messages and text.startswith(self._base):
            length, digest = text_digest(self._base)
            return TextDelta(length, digest, text[len(self._base) :])
        return FullText(messages, text)

    def takeover(
        self,
        messages: Sequence[Message],
        text: str,
        sampling: Sampling,
        write: WriteSpec,
        judge: JudgeSpec | None = None,
    ) -> Iterator[TextChunk | JudgeVerdict | TakeoverDone]:
        self._join_prefill()
        msgs = tuple(messages)
        body = self._text(msgs, text)
        received = ""
        for attempt in range(2):
            call = TakeoverCall(self.session_id, body, sampling, write, judge)
            self.calls += 1
            try:
                for event in self.transport.takeover(call):
                    if isinstance(event, TextChunk):
                        received += event.text
                    elif isinstance(event, JudgeVerdict):
                        if event.accepted and judge is not None:
                            received = judge.probe  # the cloud holds the probe now
                    else:
                        self._confirm(msgs, text + received, event)
                    yield event
                return
            except errors.BaseMismatch:
                if attempt or isinstance(body, FullText) or received:
                    raise
                self.full_text_resends += 1
                body = FullText(msgs, text)

    def _confirm(self, messages: tuple[Message, ...], text: str, done: TakeoverDone) -> None:
        if text_digest(text) == (done.committed_length, done.committed_sha256):
            self._base, self._messages = text, messages
        else:  # the cloud holds something else: next call sends everything
            self._base = None
