"""Scripted stand-ins for exactly the interfaces the loop and the servicer call."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

from edge.drafter_api import DraftToken
from shared import errors
from shared.policy import judge_accepts
from shared.wire import (
    FINISH_LENGTH,
    FINISH_PROBE_ACCEPTED,
    FINISH_STOP,
    FullText,
    JudgeVerdict,
    Message,
    Sampling,
    TakeoverCall,
    TakeoverDone,
    TextChunk,
    TextDelta,
    Timings,
    Usage,
    text_digest,
)


@dataclass
class ScriptedDrafter:
    """Writes tokens from a script, in order, whatever the text (like a sampler would)."""

    tokens: list[str]
    calls: list[tuple[str, int]] = field(default_factory=list)
    end_when_empty: bool = True

    def draft(
        self, messages: Sequence[Message], text: str, max_tokens: int, sampling: Sampling
    ) -> Generator[DraftToken, None, None]:
        self.calls.append((text, max_tokens))
        for _ in range(max_tokens):
            if not self.tokens:
                if self.end_when_empty:
                    yield DraftToken("", finish=FINISH_STOP)
                return
            yield DraftToken(self.tokens.pop(0))


@dataclass
class ScriptedCloud:
    """A cloud transport that keeps the committed text per session like the real one,
    checks delta bases, and writes scripted replies (one list of tokens per call)."""

    replies: list[list[str]]
    end_of_sequence_on_last: bool = False
    calls: list[TakeoverCall] = field(default_factory=list)
    committed: dict[str, str] = field(default_factory=dict)
    fail_with: list[errors.SpecThinkError | None] = field(default_factory=list)
    fail_after_tokens: int | None = None
    # finish reason of each call's final message, in order (default: length, or end of
    # sequence on the last reply with end_of_sequence_on_last)
    finish_reasons: list[str] = field(default_factory=list)
    # the judge's score of each judged call's probe, in order; a judged call when none is
    # left is served like a cloud that predates the judge (it writes, no verdict)
    judge_scores: list[float] = field(default_factory=list)
    judges_at: float | None = None  # the threshold it applies (None: the caller's)

    def restart(self) -> None:
        self.committed.clear()

    prefills: list[tuple[str, FullText | TextDelta]] = field(default_factory=list)

    def _resolve(self, session_id: str, body: FullText | TextDelta) -> str:
        if isinstance(body, FullText):
            return body.assistant_text
        held = self.committed.get(session_id)
        if held is None or text_digest(held) != (body.base_length, body.base_sha256):
            raise errors.BaseMismatch("base does not match")
        return held + body.append

    def prefill(self, session_id: str, body: FullText | TextDelta) -> tuple[int, str]:
        self.prefills.append((session_id, body))
        text = self._resolve(session_id, body)
        self.committed[session_id] = text
        return text_digest(text)

    def takeover(self, call: TakeoverCall) -> Iterator[TextChunk | JudgeVerdict | TakeoverDone]:
        self.calls.append(call)
        failure = self.fail_with.pop(0) if self.fail_with else None
        if failure is not None:
            raise failure
        text = self._resolve(call.session_id, call.text)
        if call.judge is not None and self.judge_scores:
            score = self.judge_scores.pop(0)
            threshold = call.judge.accept_at if self.judges_at is None else self.judges_at
            accepted = judge_accepts(score, threshold)
            yield JudgeVerdict(accepted, score, len(call.judge.probe), 0.01)
            if accepted:
                kept = text + call.judge.probe
                self.committed[call.session_id] = kept
                yield TakeoverDone(
                    FINISH_PROBE_ACCEPTED,
                    Usage(len(kept), len(text), len(call.judge.probe), 0),
                    Timings(),
                    None,
                    *text_digest(kept),
                )
                return
        reply = self.replies.pop(0) if self.replies else ["."]
        written = call.write.preamble
        if call.write.preamble:
            yield TextChunk(call.write.preamble, 0)
        for i, token in enumerate(reply[: call.write.max_tokens]):
            if self.fail_after_tokens is not None and i == self.fail_after_tokens:
                self.fail_after_tokens = None
                raise errors.Unavailable("connection reset")
            written += token
            yield TextChunk(token, 1)
        self.committed[call.session_id] = text + written
        n = min(len(reply), call.write.max_tokens)
        eos = self.end_of_sequence_on_last and not self.replies
        finish = self.finish_reasons.pop(0) if self.finish_reasons else None
        yield TakeoverDone(
            finish_reason=finish or (FINISH_STOP if eos else FINISH_LENGTH),
            usage=Usage(
                prompt_tokens=len(text),
                cached_tokens=0,
                prefilled_tokens=len(text),
                generated_tokens=n,
            ),
            timings=Timings(),
            continued_on=None,
            committed_length=text_digest(text + written)[0],
            committed_sha256=text_digest(text + written)[1],
        )
