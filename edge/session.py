"""The session loop: the small model drafts, the policy decides at each break, the cloud writes.

It knows two interfaces only, a `Drafter` (the small model: edge/drafter_api.py) and a
`CloudTransport` (one streaming takeover call, driven through edge/cloud_session.py's
`CloudSession`), so tests script both and production plugs in llama.cpp and gRPC. Text is
the truth: the loop holds the answer as a string, and the drafter re-tokenizes it after
every takeover. What it produces (the `Answer`, its segments and stats, the `Event`s it
reports as it goes) is edge/answer.py's; it renders nothing itself.

The phases, as `SpeculativeSession.run` calls them:
  open       -> the policy decides who writes the opening (the cloud in non-reasoning mode)
  draft      -> the small model writes until a paragraph break, streaming
  look ahead -> at a break it drafts a short probe of the next paragraph (reasoning mode)
  decide     -> shared.policy keeps the probe or hands the pen to the large model
  hand over  -> one streaming call; the cloud writes n1 (+ n2 when it verifies) tokens;
                with the cloud-judge trigger the call carries the probe, and the cloud first
                judges it: kept (the edge writes on after it) or rolled back (it writes)
  fall back  -> if the cloud fails, the small model writes what the cloud did not of its
                n1 tokens, up to the next break, where the policy decides again
  edge alone -> once the text no longer fits the cloud (its context is full, or the text is
                over its limit), the small model writes the rest of the answer, and says so

A reasoning model answers inside a think block. Whether the answer is in it is decided
once, on the wire: the assistant text itself starts with `<think>\n`
(`SessionOptions.think_prefix`), and each side joins its rendered prompt to the text
without doubling it (`shared.prompting.join_prompt`), whatever its chat template's revision
appends to the generation prompt.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edge.answer import Answer, CloudRefused, Event, EventSink, Segment, Stats
from edge.cloud_session import CloudSession
from edge.drafter_api import Drafter, DraftToken
from edge.options import Strategy
from shared import errors, policy
from shared.policy import Decision, PolicyConfig, PolicyState, Rule, Writer
from shared.wire import (
    FINISH_CONTEXT_FULL,
    FINISH_LENGTH,
    FINISH_STOP,
    JudgeSpec,
    JudgeVerdict,
    Message,
    Sampling,
    TakeoverDone,
    TextChunk,
    WriteSpec,
)

CLOUD_ONLY_CHUNK_TOKENS = (
    64  # cloud strategy: tokens per call, so a failure or timeout loses little
)


@dataclass
class SessionOptions:
    strategy: Strategy = Strategy.SPECULATIVE
    max_tokens: int = 2048
    sampling: Sampling = field(default_factory=Sampling)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # push the edge's new text to the cloud every this many drafted tokens (0 = never),
    # so the next takeover finds its KV cache warm (the Prefill RPC, in the background)
    prefill_every: int = 0
    # the text a reasoning model's answer starts with ("<think>\n"), or "" (see the top)
    think_prefix: str = ""


class SpeculativeSession:
    """One answer: run() drives draft / look ahead / decide / hand over until the end."""

    def __init__(
        self,
        drafter: Drafter,
        cloud: CloudSession | None,
        options: SessionOptions,
        sink: EventSink | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if options.strategy not in set(Strategy):
            raise ValueError(f"unknown strategy {options.strategy!r}")
        if options.strategy != Strategy.EDGE and cloud is None:
            raise ValueError(f"strategy {options.strategy!r} needs a cloud")
        self.drafter = drafter
        self.cloud = cloud
        self.options = options
        self.sink = sink or (lambda event: None)
        self.clock = clock
        self.state = PolicyState.initial(options.policy)
        self.text = ""
        self.segments: list[Segment] = []
        self.stats = Stats()
        self.notices: list[str] = []
        self.finish: str | None = None
        self._messages: tuple[Message, ...] = ()
        self._t0 = 0.0

    # -- bookkeeping --

    @property
    def remaining(self) -> int:
        return self.options.max_tokens - self.stats.edge_tokens - self.stats.cloud_tokens

    def _open_segment(self, source: str, reason: str) -> Segment:
        segment = Segment(source, "", 0, reason)
        self.segments.append(segment)
        self.sink(Event("segment", {"source": source, "reason": reason}))
        return segment

    def _write(self, segment: Segment, text: str, tokens: int) -> None:
        if text and tokens and not self.stats.ttft_s:  # a model wrote it (not a preamble)
            self.stats.ttft_s = self.clock() - self._t0
        segment.text += text
        segment.tokens += tokens
        self.text += text
        if segment.source == "edge":
            self.stats.edge_tokens += tokens
        else:
            self.stats.cloud_tokens += tokens
        if text:
            self.sink(Event("text", {"source": segment.source, "text": text}))

    def _notice(self, kind: str, message: str, **data: Any) -> None:
        self.notices.append(message)
        self.sink(Event(kind, {"message": message, **data}))

    def answer_so_far(self, finish: str | None = None) -> Answer:
        """The answer as far as it got (also after an interruption, with its finish)."""
        if finish is not None:
            self.finish = finish
        self.segments = [s for s in self.segments if s.text or s.tokens]
        self.stats.takeovers = sum(1 for s in self.segments if s.source == "cloud")
        self.stats.wall_s = self.clock() - self._t0
        if self.cloud is not None:
            self.cloud.forget()  # joins a prefill still in flight (a bounded wait)
            self.stats.cloud_calls = self.cloud.calls
            self.stats.full_text_resends = self.cloud.full_text_resends
            self.stats.cloud_prefills = self.cloud.prefills
            self.stats.cloud_prefills_abandoned = self.cloud.prefills_abandoned
        return Answer(
            self.text, self.finish or FINISH_LENGTH, self.segments, self.stats, self.notices
        )

    # -- the phases --

    def run(self, messages: Sequence[Message]) -> Answer:
        self._messages = tuple(messages)
        self._t0 = self.clock()
        if self.options.think_prefix and not self.text:
            self._open_think_block()
        try:
            if self.options.strategy == Strategy.EDGE:
                self._draft(self.remaining, Rule.EDGE_DRAFT, stop_at_break=False)
            elif self.options.strategy == Strategy.CLOUD:
                self._cloud_writes_everything()
            else:
                self._speculate()
        except errors.SpecThinkError as exc:
            raise CloudRefused(exc, self.answer_so_far()) from exc
        if self.finish is None:
            self.finish = FINISH_LENGTH
        answer = self.answer_so_far()
        self.sink(Event("done", answer.to_json()))
        return answer

    def _open_think_block(self) -> None:
        """A reasoning model's answer starts inside its think block, on the wire: the text
        opens with it (no model wrote it, so it counts no tokens)."""
        self._write(self._open_segment("edge", "think_block"), self.options.think_prefix, 0)

    def _speculate(self) -> None:
        opening = policy.decide_start(self.options.policy)
        if opening.writer is Writer.CLOUD:
            self._hand_over(opening)
        while self.finish is None and self.remaining > 0:
            if not self.text or not policy.ends_paragraph(self.text):
                self._draft(self.remaining, Rule.EDGE_DRAFT, stop_at_break=True)
                continue
            self._at_break()

    def _at_break(self) -> None:
        """Look ahead, decide, and either keep the probe or hand over."""
        config = self.options.policy
        probe: list[DraftToken] = []
        if policy.needs_probe(config, self.state):
            probe = self._look_ahead(min(config.probe_tokens, self.remaining))
        probe_text = "".join(t.text for t in probe)
        entropies = [t.entropy for t in probe if t.entropy is not None]
        decision = policy.decide_at_break(config, self.state, probe_text, entropies)
        if decision.writer is Writer.EDGE:
            self._draft_on(probe, self._write_probe(probe, decision.reason))
        elif decision.asks_judge:
            self._hand_over(decision, probe)
        else:
            self.stats.probe_tokens_discarded += sum(1 for t in probe if t.finish is None)
            self._hand_over(decision)

    def _write_probe(self, probe: Sequence[DraftToken], reason: str) -> Segment:
        """The small model's probe becomes the answer's next text."""
        segment = self._open_segment("edge", reason)
        self._write(segment, "".join(t.text for t in probe), _written(probe))
        return segment

    def _draft_on(self, probe: Sequence[DraftToken], segment: Segment) -> None:
        """After a kept probe, the small model writes on to the next break."""
        # a drafter that writes nothing more has ended, whether or not it said so
        self.finish = next((t.finish for t in probe if t.finish), None if probe else FINISH_STOP)
        if self.finish is None and not policy.ends_paragraph(self.text):
            self._draft(self.remaining, Rule.EDGE_DRAFT, stop_at_break=True, segment=segment)

    def _draft(
        self, budget: int, rule: Rule, stop_at_break: bool, segment: Segment | None = None
    ) -> None:
        """The small model writes (streaming) until a break, its end, or the budget."""
        segment = segment or self._open_segment("edge", str(rule))
        started = self.clock()
        written = 0
        tokens = self.drafter.draft(self._messages, self.text, budget, self.options.sampling)
        with contextlib.closing(tokens):
            for token in tokens:
                if token.finish:
                    self.finish = token.finish
                    break
                self._write(segment, token.text, 1)
                written += 1
                if stop_at_break and policy.ends_paragraph(self.text):
                    break
                if self._prefill_due(written):
                    self.cloud.prefill_async(self._messages, self.text)  # type: ignore[union-attr]
        self.stats.edge_draft_s += self.clock() - started
        if self.finish is None and (self.remaining <= 0 or written == 0):
            # out of budget, or a drafter that writes nothing more has ended
            self.finish = FINISH_LENGTH if self.remaining <= 0 else FINISH_STOP

    def _prefill_due(self, written: int) -> bool:
        every = self.options.prefill_every
        return bool(
            every
            and self.cloud is not None
            and self.options.strategy == Strategy.SPECULATIVE
            and written % every == 0
        )

    def _look_ahead(self, budget: int) -> list[DraftToken]:
        """Draft a probe of the next paragraph, not shown until the policy keeps it."""
        probe: list[DraftToken] = []
        started = self.clock()
        measure = {"uncertainty": True} if policy.needs_uncertainty(self.options.policy) else {}
        tokens = self.drafter.draft(
            self._messages, self.text, budget, self.options.sampling, **measure
        )
        with contextlib.closing(tokens):
            text = ""
            for token in tokens:
                probe.append(token)
                text += token.text
                if token.finish or policy.ends_paragraph(text):
                    break
        self.stats.edge_draft_s += self.clock() - started
        return probe

    def _hand_over(self, decision: Decision, probe: Sequence[DraftToken] = ()) -> None:
        """One call: the cloud writes decision.tokens (+ its verification continuation).
        A decision that `asks_judge` sends `probe` along: the cloud's verdict comes first,
        and a kept probe ends the call (the small model writes on after it)."""
        assert self.cloud is not None
        budget = min(decision.tokens, self.remaining)
        write = WriteSpec(
            max_tokens=budget,
            preamble=decision.preamble,
            continue_if=decision.continue_if,
            continue_tokens=max(0, min(decision.continue_tokens, self.remaining - budget)),
        )
        judge = None
        if decision.asks_judge and decision.judge_threshold is not None:
            judge = JudgeSpec("".join(t.text for t in probe), decision.judge_threshold)
            self.stats.judge_calls += 1
            self.sink(Event("judging", {"probe_tokens": _written(probe)}))
        segment = None if judge else self._cloud_segment(decision, budget)
        kept: Segment | None = None  # the probe, when the cloud kept it
        started = self.clock()
        first_chunk = True
        waited: float | None = None  # set when the cloud failed: local writing is not waiting
        outgrown: str | None = None  # why the text no longer fits the cloud
        try:
            for event in self.cloud.takeover(
                self._messages, self.text, self.options.sampling, write, judge
            ):
                if isinstance(event, JudgeVerdict):
                    decision = self._verdict(decision, event, self.clock() - started)
                    if decision.writer is Writer.EDGE:
                        kept = self._write_probe(probe, decision.reason)
                    else:
                        self.stats.probe_tokens_discarded += _written(probe)
                        segment = self._cloud_segment(decision, budget)
                elif isinstance(event, TextChunk):
                    if segment is None:  # a cloud that does not judge wrote all the same
                        segment = self._cloud_segment(decision, budget)
                    if first_chunk:
                        self.stats.cloud_first_chunk_s.append(self.clock() - started)
                        first_chunk = False
                    self._write(segment, event.text, event.tokens)
                else:
                    self._cloud_done(segment, event)
                    if event.finish_reason == FINISH_CONTEXT_FULL:
                        outgrown = "its context window is full"
        except errors.TextTooLong as exc:  # a size refusal is no bad request: write on
            waited, outgrown = self.clock() - started, exc.message
        except (errors.Unauthenticated, errors.InvalidRequest):
            raise
        except errors.SpecThinkError as exc:
            waited = self.clock() - started
            if segment is not None:
                self._fall_back(decision, segment, budget, exc)
            elif kept is None:  # no verdict came: the small model's probe stands
                self._notice_fallback(exc)
                kept = self._write_probe(probe, f"fallback:{type(exc).__name__}:{decision.reason}")
        finally:
            self.stats.cloud_wait_s += waited if waited is not None else self.clock() - started
            if segment is not None and (segment.text or segment.tokens):
                # the policy counts what the large model wrote, never the edge's stand-in;
                # a hand-over where the cloud wrote nothing did not happen, for the policy
                self.state = policy.after_takeover(
                    self.options.policy, self.state, decision, segment.text
                )
        if outgrown is not None:
            self._edge_alone(decision, outgrown)
        elif kept is not None and self.finish is None:
            self._draft_on(probe, kept)

    def _cloud_segment(self, decision: Decision, budget: int) -> Segment:
        """The cloud is to write: say so, and open its segment."""
        self.sink(Event("takeover", {"reason": decision.reason, "tokens": budget}))
        self.stats.takeover_attempts += 1
        return self._open_segment("cloud", decision.reason)

    def _verdict(self, decision: Decision, verdict: JudgeVerdict, waited_s: float) -> Decision:
        """The cloud judged the probe: the policy's decision with its score."""
        self.stats.judge_wait_s += waited_s
        self.stats.judge_prefill_s += verdict.prefill_s
        judged = policy.judged(decision, verdict.score)
        if (judged.writer is Writer.EDGE) != verdict.accepted:
            # the cloud applied another threshold than it was sent: what it did stands
            said = verdict.score if verdict.accepted else math.inf
            judged = policy.judged(replace(decision, judge_threshold=said), verdict.score)
        self.stats.judge_accepts += int(verdict.accepted)
        self.sink(
            Event(
                "judge",
                {"score": verdict.score, "accepted": verdict.accepted, "reason": judged.reason},
            )
        )
        return judged

    def _cloud_done(self, segment: Segment | None, done: TakeoverDone) -> None:
        self.stats.cloud_cached_tokens += done.usage.cached_tokens
        self.stats.cloud_prefill_tokens += done.usage.prefilled_tokens
        if done.continued_on and segment is not None:
            segment.reason += f"+verification:{done.continued_on}"
        if done.finish_reason == FINISH_STOP:
            self.finish = FINISH_STOP
        elif self.remaining <= 0:
            self.finish = FINISH_LENGTH

    def _fall_back(
        self, decision: Decision, segment: Segment, budget: int, exc: errors.SpecThinkError
    ) -> None:
        """The cloud failed: keep what it sent, and the small model writes what is left of
        the cloud's n1 tokens, up to the next break (where the policy decides again)."""
        kind = self._notice_fallback(exc)
        rest = min(budget - segment.tokens, self.remaining)
        if rest > 0 and self.finish is None:
            local = self._open_segment("edge", f"fallback:{kind}:{decision.reason}")
            self._draft(rest, Rule.EDGE_DRAFT, stop_at_break=True, segment=local)

    def _notice_fallback(self, exc: errors.SpecThinkError) -> str:
        """Count a failed call, say so (once per kind, the renderer decides), and forget
        what the cloud held. Returns the error's kind."""
        self.stats.fallback = True
        self.stats.fallbacks += 1
        kind = type(exc).__name__
        self._notice("fallback", f"{_in_words(exc)} ({exc.message}); writing locally", error=kind)
        if self.cloud is not None:
            self.cloud.forget()
        return kind

    def _edge_alone(self, decision: Decision, why: str) -> None:
        """The text no longer fits the cloud, and it only grows: the small model writes the
        rest of the answer, and says so once."""
        self.stats.fallback = True
        self.stats.cloud_full = True
        self._notice(
            "fallback",
            f"the answer no longer fits the cloud ({why}); the edge writes the rest alone",
            error="ContextFull",
        )
        if self.cloud is not None:
            self.cloud.forget()
        if self.finish is None and self.remaining > 0:
            local = self._open_segment("edge", f"edge_alone:context_full:{decision.reason}")
            self._draft(self.remaining, Rule.EDGE_DRAFT, stop_at_break=False, segment=local)

    def _cloud_writes_everything(self) -> None:
        """The cloud-only baseline: the large model writes the whole answer."""
        while self.finish is None and self.remaining > 0:
            tokens = min(CLOUD_ONLY_CHUNK_TOKENS, self.remaining)
            self._hand_over(Decision(Writer.CLOUD, Rule.CLOUD_ONLY, None, tokens))


def _written(probe: Sequence[DraftToken]) -> int:
    """Tokens a probe holds (its end marker is none)."""
    return sum(1 for t in probe if t.finish is None)


def _in_words(exc: errors.SpecThinkError) -> str:
    """What went wrong with the cloud, for a person (the error's class stays in --json's
    `error` and the segment's reason)."""
    for kind, words in (
        (errors.Stalled, "the cloud stopped answering"),
        (errors.NeverReached, "the cloud is not usable"),
        (errors.Overloaded, "the cloud is too busy"),
        (errors.Unavailable, "the cloud could not be reached"),
        (errors.DeadlineExceeded, "the cloud took too long"),
        (errors.BaseMismatch, "the cloud lost this answer"),
        (errors.SessionNotFound, "the cloud lost this answer"),
        (errors.Cancelled, "the call to the cloud was cancelled"),
    ):
        if isinstance(exc, kind):
            return words
    return "the cloud failed"
