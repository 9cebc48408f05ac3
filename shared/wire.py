"""Plain dataclasses for what crosses the wire, and their conversion to and from protobuf.

Both sides work with these types; only this module and the gRPC glue touch generated
messages. Text identity is `text_digest`: the length in code points and the SHA-256 of
the UTF-8 bytes, which is how a delta names the base it extends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from shared.rpc import specthink_pb2 as pb

# Finish reasons, as the edge's --json reports them.
FINISH_LENGTH = "length"
FINISH_STOP = "stop"  # end of sequence: the answer is complete
FINISH_STOP_STRING = "stop_string"
FINISH_CONTEXT_FULL = "context_full"
FINISH_PROBE_ACCEPTED = "probe_accepted"  # a judged takeover: the cloud kept the probe

_FINISH_TO_PB = {
    FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    FINISH_STOP: pb.FINISH_REASON_END_OF_SEQUENCE,
    FINISH_STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FINISH_CONTEXT_FULL: pb.FINISH_REASON_CONTEXT_FULL,
    FINISH_PROBE_ACCEPTED: pb.FINISH_REASON_PROBE_ACCEPTED,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


def text_digest(text: str) -> tuple[int, str]:
    """(length in code points, lower-case hex SHA-256 of the UTF-8 bytes)."""
    return len(text), hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    """The paper's evaluation sampling by default: temperature 0.6, top_p 0.95, top_k 50."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 50
    seed: int | None = None


@dataclass(frozen=True)
class WriteSpec:
    max_tokens: int
    stop: tuple[str, ...] = ()
    preamble: str = ""
    continue_if: tuple[str, ...] = ()
    continue_tokens: int = 0


@dataclass(frozen=True)
class FullText:
    messages: tuple[Message, ...]
    assistant_text: str


@dataclass(frozen=True)
class TextDelta:
    base_length: int
    base_sha256: str
    append: str


@dataclass(frozen=True)
class JudgeSpec:
    """The caller's probe, for the cloud to keep (score at or above `accept_at`) or roll
    back and write instead (the cloud-judge trigger; `shared.policy`)."""

    probe: str
    accept_at: float


@dataclass(frozen=True)
class TakeoverCall:
    session_id: str
    text: FullText | TextDelta
    sampling: Sampling = field(default_factory=Sampling)
    write: WriteSpec = field(default_factory=lambda: WriteSpec(max_tokens=20))
    judge: JudgeSpec | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass(frozen=True)
class TextChunk:
    """A piece of the cloud's text and how many of its tokens it holds."""

    text: str
    tokens: int


@dataclass(frozen=True)
class JudgeVerdict:
    """The cloud's judgement of a probe (the first event of a judged takeover)."""

    accepted: bool
    score: float  # mean log-probability of the probe's tokens, nats per token
    probe_tokens: int  # the cloud's tokens it averages
    prefill_s: float  # the prefill of the text and the probe


@dataclass(frozen=True)
class TakeoverDone:
    finish_reason: str
    usage: Usage
    timings: Timings
    continued_on: str | None
    committed_length: int
    committed_sha256: str


# ---- protobuf conversion --------------------------------------------------------------


def _text_to_pb(text: FullText | TextDelta, msg: pb.TakeoverRequest | pb.PrefillRequest) -> None:
    if isinstance(text, FullText):
        msg.full.assistant_text = text.assistant_text
        for m in text.messages:
            msg.full.messages.add(role=m.role, content=m.content)
    else:
        msg.delta.base_length = text.base_length
        msg.delta.base_sha256 = text.base_sha256
        msg.delta.append = text.append


def text_from_pb(msg: pb.TakeoverRequest | pb.PrefillRequest) -> FullText | TextDelta | None:
    which = msg.WhichOneof("text")
    if which == "full":
        messages = tuple(Message(m.role, m.content) for m in msg.full.messages)
        return FullText(messages, msg.full.assistant_text)
    if which == "delta":
        d = msg.delta
        return TextDelta(d.base_length, d.base_sha256, d.append)
    return None


def call_to_pb(call: TakeoverCall) -> pb.TakeoverRequest:
    req = pb.TakeoverRequest(session_id=call.session_id)
    _text_to_pb(call.text, req)
    s = call.sampling
    req.sampling.temperature = s.temperature
    req.sampling.top_p = s.top_p
    req.sampling.top_k = s.top_k
    if s.seed is not None:
        req.sampling.has_seed = True
        req.sampling.seed = s.seed
    w = call.write
    req.write.max_tokens = w.max_tokens
    req.write.stop.extend(w.stop)
    req.write.preamble = w.preamble
    req.write.continue_if_contains.extend(w.continue_if)
    req.write.continue_tokens = w.continue_tokens
    if call.judge is not None:
        req.judge.probe = call.judge.probe
        req.judge.accept_at_or_above = call.judge.accept_at
    return req


def judge_from_pb(req: pb.TakeoverRequest) -> JudgeSpec | None:
    if not req.HasField("judge"):
        return None
    return JudgeSpec(req.judge.probe, req.judge.accept_at_or_above)


def prefill_to_pb(session_id: str, text: FullText | TextDelta) -> pb.PrefillRequest:
    req = pb.PrefillRequest(session_id=session_id)
    _text_to_pb(text, req)
    return req


def sampling_from_pb(s: pb.Sampling) -> Sampling:
    return Sampling(
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        seed=s.seed if s.has_seed else None,
    )


def write_from_pb(w: pb.WriteSpec) -> WriteSpec:
    return WriteSpec(
        max_tokens=w.max_tokens,
        stop=tuple(w.stop),
        preamble=w.preamble,
        continue_if=tuple(w.continue_if_contains),
        continue_tokens=w.continue_tokens,
    )


def usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        cached_tokens=u.cached_tokens,
        prefilled_tokens=u.prefilled_tokens,
        generated_tokens=u.generated_tokens,
    )


def usage_from_pb(u: pb.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.cached_tokens, u.prefilled_tokens, u.generated_tokens)


def done_to_pb(done: TakeoverDone) -> pb.TakeoverEvent:
    t = done.timings
    return pb.TakeoverEvent(
        done=pb.TakeoverDone(
            finish_reason=_FINISH_TO_PB[done.finish_reason],
            usage=usage_to_pb(done.usage),
            timings=pb.Timings(queue_s=t.queue_s, prefill_s=t.prefill_s, decode_s=t.decode_s),
            continued=done.continued_on is not None,
            continued_on=done.continued_on or "",
            committed_length=done.committed_length,
            committed_sha256=done.committed_sha256,
        )
    )


def chunk_to_pb(chunk: TextChunk) -> pb.TakeoverEvent:
    return pb.TakeoverEvent(chunk=pb.TextChunk(text=chunk.text, tokens=chunk.tokens))


def verdict_to_pb(verdict: JudgeVerdict) -> pb.TakeoverEvent:
    return pb.TakeoverEvent(
        verdict=pb.JudgeVerdict(
            accepted=verdict.accepted,
            score=verdict.score,
            probe_tokens=verdict.probe_tokens,
            prefill_s=verdict.prefill_s,
        )
    )


def event_from_pb(event: pb.TakeoverEvent) -> TextChunk | JudgeVerdict | TakeoverDone:
    which = event.WhichOneof("event")
    if which == "chunk":
        return TextChunk(event.chunk.text, event.chunk.tokens)
    if which == "verdict":
        v = event.verdict
        return JudgeVerdict(v.accepted, v.score, v.probe_tokens, v.prefill_s)
    return done_from_pb(event.done)


def done_from_pb(d: pb.TakeoverDone) -> TakeoverDone:
    return TakeoverDone(
        finish_reason=_FINISH_FROM_PB.get(d.finish_reason, FINISH_LENGTH),
        usage=usage_from_pb(d.usage),
        timings=Timings(d.timings.queue_s, d.timings.prefill_s, d.timings.decode_s),
        continued_on=d.continued_on if d.continued else None,
        committed_length=d.committed_length,
        committed_sha256=d.committed_sha256,
    )
