"""A takeover's writing, once the servicer's checks passed and its turn came (cloud/servicer.py):
  judge    -> when the call carries a probe (the cloud-judge trigger): prefill the text and
              the probe, score the probe by the model's own likelihood, keep it or not
              (`shared.policy.judge_accepts`); a kept probe is the call's text
  write    -> stream the preamble, then the engine's n tokens
  verify   -> if the written text has a verification keyword, n2 more tokens, same call

A text that does not fit the model's context window is not an error: the writing ends
normally with finish reason CONTEXT_FULL and what was written so far (nothing, when the
prompt alone does not fit), so the caller goes on without the cloud.

It drives any `cloud.engine_api.Engine` and streams protobuf events; it imports neither
torch nor grpc. Failures leave as the shared error tree (a stopped call as the caller's
`stopped()`), which the servicer turns into gRPC statuses in one place
(`cloud.rpc_calls.RpcCalls.abort`); committing the session's text is the servicer's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from dataclasses import dataclass

from cloud.engine_api import (
    Engine,
    EngineCancelled,
    EngineContextFull,
    EngineOutOfMemory,
    Generated,
    GenerateRequest,
    Prefilled,
)
from cloud.metrics import Metrics
from shared import errors
from shared.policy import continuation_keyword, judge_accepts, judge_score
from shared.rpc import specthink_pb2 as pb
from shared.wire import (
    FINISH_CONTEXT_FULL,
    FINISH_LENGTH,
    FINISH_PROBE_ACCEPTED,
    JudgeSpec,
    JudgeVerdict,
    Message,
    Sampling,
    TextChunk,
    Usage,
    WriteSpec,
    chunk_to_pb,
    verdict_to_pb,
)


@dataclass(frozen=True)
class Written:
    """What a takeover wrote (or kept: a judged probe), and what it cost."""

    text: str
    finish_reason: str
    usage: Usage
    prefill_s: float
    decode_s: float = 0.0
    continued_on: str | None = None

    def after(self, scored: Prefilled) -> Written:
        """This write, counting the judge's prefill before it."""
        u = self.usage
        usage = Usage(
            u.prompt_tokens,
            u.cached_tokens,
            u.prefilled_tokens + scored.usage.prefilled_tokens,
            u.generated_tokens,
        )
        prefill_s = self.prefill_s + scored.prefill_s
        return dataclasses.replace(self, usage=usage, prefill_s=prefill_s)


@dataclass(frozen=True)
class TakeoverWriting:
    """The engine's work for one accepted takeover: on the session `key`, after `messages`,
    continuing `text` (the session's text with the call's delta applied)."""

    model: Callable[[], Engine]  # the engine, or UNAVAILABLE while the model is loading
    metrics: Metrics
    clock: Callable[[], float]
    key: str
    messages: tuple[Message, ...]
    text: str
    should_stop: Callable[[], bool]
    stopped: Callable[[], errors.SpecThinkError]  # why the call stopped, once it has

    def run(
        self, sampling: Sampling, write: WriteSpec, judge: JudgeSpec | None, started: float
    ) -> Generator[pb.TakeoverEvent, None, Written]:
        """Judge the probe when the call carries one (its verdict streamed first), then
        write unless the probe was kept; the generator's return value is what was written."""
        out: Written | None = None
        scored: Prefilled | None = None
        if judge is not None:
            verdict, scored = self.judge(judge)
            yield verdict_to_pb(verdict)
            if verdict.accepted:  # the probe stays: it is this call's text
                out = Written(judge.probe, FINISH_PROBE_ACCEPTED, scored.usage, scored.prefill_s)
        if out is None:
            out = yield from self.write(sampling, write, started)
            if scored is not None:  # the judge's prefill is this call's work too
                out = out.after(scored)
        return out

    def write(
        self, sampling: Sampling, write: WriteSpec, started: float
    ) -> Generator[pb.TakeoverEvent, None, Written]:
        """Stream the preamble and the engine's tokens; then, when they hold a verification
        keyword, the continuation in the same call."""
        written = write.preamble
        if write.preamble:
            yield chunk_to_pb(TextChunk(write.preamble, 0))
        ask = GenerateRequest(
            self.key, self.messages, self.text + written, write.max_tokens, sampling, write.stop
        )
        result = yield from self._generate(ask, started)
        out = Written(
            written + result.text,
            result.finish_reason,
            result.usage,
            result.prefill_s,
            result.decode_s,
        )
        continued_on = None
        if result.finish_reason == FINISH_LENGTH and write.continue_tokens:
            continued_on = continuation_keyword(result.text, write.continue_if)
        if not continued_on:
            return out
        ask = dataclasses.replace(
            ask, assistant_text=self.text + out.text, max_tokens=write.continue_tokens
        )
        more = yield from self._generate(ask, None)
        return Written(
            out.text + more.text,
            more.finish_reason,
            Usage(
                out.usage.prompt_tokens,
                out.usage.cached_tokens,
                out.usage.prefilled_tokens + more.usage.prefilled_tokens,
                out.usage.generated_tokens + more.usage.generated_tokens,
            ),
            out.prefill_s + more.prefill_s,
            out.decode_s + more.decode_s,
            continued_on,
        )

    def judge(self, judge: JudgeSpec) -> tuple[JudgeVerdict, Prefilled]:
        """Prefill the text and the probe, score the probe, decide (`shared.policy`)."""
        ask = GenerateRequest(self.key, self.messages, self.text, probe=judge.probe)
        try:
            scored = self.model().prefill(ask, self.should_stop)
        except EngineCancelled:
            raise self.stopped() from None
        except EngineContextFull:  # the probe does not fit: the write says what does
            scored = Prefilled(Usage(), 0.0)
        except EngineOutOfMemory:
            raise errors.Overloaded("the model ran out of device memory", 2.0) from None
        score = judge_score(scored.probe_logprobs)
        accepted = bool(scored.probe_logprobs) and judge_accepts(score, judge.accept_at)
        self.metrics.inc("judge_verdicts", verdict="accepted" if accepted else "rejected")
        self.metrics.observe("judge_score", score)
        verdict = JudgeVerdict(accepted, score, len(scored.probe_logprobs), scored.prefill_s)
        return verdict, scored

    def _generate(
        self, request: GenerateRequest, started: float | None
    ) -> Generator[pb.TakeoverEvent, None, Generated]:
        """Stream the engine's chunks; the generator's return value is the Generated.
        `started`: when the call began, to observe its time to first token (None: not
        this stretch).

        A text that does not fit the context window ends the stretch normally with
        CONTEXT_FULL and what was streamed of it (nothing, if the prompt alone does not
        fit): the caller goes on without the cloud; it is not a bad request."""
        streamed, tokens = "", 0
        try:
            for item in self.model().generate(request, self.should_stop):
                if isinstance(item, Generated):
                    return item
                if started is not None:
                    self.metrics.observe("ttft", self.clock() - started)
                    started = None
                streamed, tokens = streamed + item.text, tokens + item.tokens
                yield chunk_to_pb(item)
        except EngineCancelled:
            raise self.stopped() from None
        except EngineContextFull:
            return Generated(FINISH_CONTEXT_FULL, Usage(0, 0, 0, tokens), 0.0, 0.0, streamed)
        except EngineOutOfMemory:  # it ran out of device memory alone: try again later
            raise errors.Overloaded("the model ran out of device memory", 2.0) from None
        raise errors.InternalError("engine ended without a result")
