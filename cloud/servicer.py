"""The gRPC servicer: validation, auth, sessions, admission and the one-round-trip takeover.

It imports no torch: it drives any `cloud.engine_api.Engine`, so tests run it with a
scripted engine. Every error leaves through `cloud.rpc_calls.RpcCalls.abort`, the one place
where the shared error tree becomes a gRPC status. Prompt text is never logged unless
`log_prompts`.

A takeover, as `_takeover` runs it:
  check    -> auth, field validation, resolve the delta against the session's text
  queue    -> wait for the engine (bounded; RESOURCE_EXHAUSTED when full)
  write    -> judge a probe, write, verify, streaming as it goes (cloud/takeover_writing.py;
              a text that outgrows the context window ends it with CONTEXT_FULL, no error)
  commit   -> record the session's new text, only if the caller is still there and the
              session's turn, then send the final message (the session keeps accepting
              the previous base too, in case that message never arrives)

Logs are one JSON object per line with the request id (the caller's `x-request-id`
metadata when it sends a sane one, else a fresh one; echoed back in the initial
metadata), the session id and the caller's key id (never the key). Prompt and answer
text appear only with `log_prompts`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from cloud import validation
from cloud.admission import Admission
from cloud.auth import ANONYMOUS, ApiKeys
from cloud.engine_api import Engine, EngineCancelled, EngineContextFull, GenerateRequest
from cloud.metrics import Metrics
from cloud.rpc_calls import CallLog, RpcCalls, parsed
from cloud.sessions import SessionStore, engine_key
from cloud.takeover_writing import TakeoverWriting
from shared import errors
from shared.rpc import specthink_pb2 as pb
from shared.rpc import specthink_pb2_grpc as rpc
from shared.wire import (
    FullText,
    JudgeSpec,
    Message,
    Sampling,
    TakeoverDone,
    TextDelta,
    Timings,
    Usage,
    WriteSpec,
    done_to_pb,
    judge_from_pb,
    sampling_from_pb,
    text_digest,
    text_from_pb,
    usage_to_pb,
    write_from_pb,
)

log = logging.getLogger("specthink.cloud")
_Fields = TypeVar("_Fields")  # what a call checks besides the text (`_accept`)
# Characters per token, roughly, for admission's cost estimate before tokenizing.
_CHARS_PER_TOKEN = 4


@dataclass
class _Accepted:
    """A call that passed the checks (`_accept`) and holds its session's turn to write."""

    key: str  # the engine's session key (the caller's key id + session id)
    messages: tuple[Message, ...]
    text: str  # the session's text with this call's delta applied
    base: str | None  # the text the delta was applied to (None: the full text was sent)
    delta_chars: int | None
    turn: int
    superseded: threading.Event
    should_stop: Callable[[], bool]

    @property
    def cost(self) -> int:
        """Admission's estimate of the prompt's tokens."""
        return len(self.text) // _CHARS_PER_TOKEN


class SpecThinkServicer(rpc.SpecThinkServicer):
    def __init__(
        self,
        engine: Engine | None,
        *,
        admission: Admission,
        sessions: SessionStore,
        limits: validation.Limits | None = None,
        api_keys: ApiKeys | None = None,
        metrics: Metrics | None = None,
        log_prompts: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.engine = engine  # None while the model loads: calls get UNAVAILABLE
        self.admission = admission
        self.sessions = sessions
        self.limits = limits or validation.Limits()
        self.api_keys = api_keys
        self.metrics = metrics or Metrics()
        self.log_prompts = log_prompts
        self.clock = clock
        self.stopping = threading.Event()  # set after the drain grace: stop work now
        self.calls = RpcCalls(self.metrics, clock)  # request ids, logs, errors -> statuses

    def _authenticate(self, context: grpc.ServicerContext, call: CallLog) -> str:
        key_id = ANONYMOUS
        if self.api_keys is not None:
            key_id = self.api_keys.authenticate(context.invocation_metadata() or ())
        call.fields["key_id"] = key_id
        return key_id

    def _session_key(self, context: grpc.ServicerContext, call: CallLog, session_id: str) -> str:
        key_id = self._authenticate(context, call)
        call.fields["session"] = validation.session_id(session_id)
        return engine_key(key_id, session_id)

    def _should_stop(
        self, context: grpc.ServicerContext, superseded: threading.Event
    ) -> Callable[[], bool]:
        def should_stop() -> bool:
            remaining = context.time_remaining()
            return (
                superseded.is_set()
                or self.stopping.is_set()
                or not context.is_active()
                or (remaining is not None and remaining <= 0)
            )

        return should_stop

    def _why_stopped(
        self, context: grpc.ServicerContext, superseded: threading.Event
    ) -> errors.SpecThinkError:
        if self.stopping.is_set():
            return errors.Unavailable("server is shutting down; resend to another replica")
        if superseded.is_set():
            return errors.Cancelled("superseded by a newer call on the same session")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return errors.DeadlineExceeded("deadline exceeded")
        return errors.Cancelled("cancelled by the client")

    def _refuse_when_draining(self) -> None:
        if self.admission.closed or self.stopping.is_set():
            raise errors.Unavailable("server is draining; resend to another replica")

    def _model(self) -> Engine:
        """The engine, or UNAVAILABLE while the model is still loading."""
        engine = self.engine
        if engine is None:
            raise errors.Unavailable("the model is still loading; retry shortly")
        return engine

    # ---- RPCs ---------------------------------------------------------------------------

    def Takeover(
        self, request: pb.TakeoverRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TakeoverEvent]:
        call = self.calls.begin("Takeover", context)
        try:
            yield from self._takeover(parsed(request), context, call)
        except errors.SpecThinkError as exc:
            self.calls.abort(context, exc, call)
        except Exception:
            log.exception("internal error in Takeover (request %s)", call.request_id)
            self.calls.abort(context, errors.InternalError("internal error"), call)
        finally:
            self._gauge_load()

    def _accept(
        self,
        context: grpc.ServicerContext,
        call: CallLog,
        session_id: str,
        sent: FullText | TextDelta | None,
        fields: Callable[[], _Fields],
    ) -> tuple[_Accepted, _Fields]:
        """The checks every call that writes a session's text passes, in order: auth and
        session id, the text's fields, the call's own `fields` (sampling, what to write),
        not draining, a model loaded, the delta resolved against the session's text and
        its size; then the session's turn is taken."""
        key = self._session_key(context, call, session_id)
        body = validation.text(sent, self.limits)
        checked = fields()
        self._refuse_when_draining()
        self._model()
        messages, text = self.sessions.resolve(key, body)
        validation.resolved_size(messages, text, self.limits)
        delta = body.append if isinstance(body, TextDelta) else None
        turn, superseded = self.sessions.begin_write(key, messages)
        accepted = _Accepted(
            key=key,
            messages=messages,
            text=text,
            base=text[: len(text) - len(delta)] if delta is not None else None,
            delta_chars=len(delta) if delta is not None else None,
            turn=turn,
            superseded=superseded,
            should_stop=self._should_stop(context, superseded),
        )
        return accepted, checked

    def _takeover(
        self, request: pb.TakeoverRequest, context: grpc.ServicerContext, call: CallLog
    ) -> Iterator[pb.TakeoverEvent]:
        # check
        def fields() -> tuple[Sampling, WriteSpec, JudgeSpec | None]:
            sampling = validation.sampling(sampling_from_pb(request.sampling))
            write = validation.write(write_from_pb(request.write), self.limits)
            return sampling, write, validation.judge(judge_from_pb(request), self.limits)

        acc, (sampling, write, judge) = self._accept(
            context, call, request.session_id, text_from_pb(request), fields
        )
        call.fields["delta_chars"] = acc.delta_chars
        # queue
        self.metrics.set("waiting", self.admission.waiting + 1)
        with self.admission.slot(acc.cost, acc.should_stop) as ticket:
            self._gauge_load()
            self.metrics.observe("queue", ticket.queue_s)
            # write
            writing = TakeoverWriting(
                self._model,
                self.metrics,
                self.clock,
                acc.key,
                acc.messages,
                acc.text,
                acc.should_stop,
                stopped=lambda: self._why_stopped(context, acc.superseded),
            )
            out = yield from writing.run(sampling, write, judge, call.started)
        self._gauge_load()
        # commit: every chunk was handed to the transport while the caller was there;
        # nothing it will not receive is committed
        committed = acc.text + out.text
        if acc.should_stop():
            raise self._why_stopped(context, acc.superseded)
        if not self.sessions.commit(acc.key, acc.turn, acc.messages, committed, acc.base):
            raise errors.Cancelled("superseded by a newer call on the same session")
        length, digest = text_digest(committed)
        yield done_to_pb(
            TakeoverDone(
                out.finish_reason,
                out.usage,
                Timings(ticket.queue_s, out.prefill_s, out.decode_s),
                out.continued_on,
                length,
                digest,
            )
        )
        self._account(call, out.usage, out.finish_reason, ticket.queue_s, committed)

    def _gauge_load(self) -> None:
        self.metrics.set("running", self.admission.running)
        self.metrics.set("waiting", self.admission.waiting)

    def _account(
        self, call: CallLog, usage: Usage, finish: str, queue_s: float, committed: str
    ) -> None:
        m = self.metrics
        elapsed = self.clock() - call.started
        m.observe("e2e", elapsed)
        m.inc("prompt_tokens", usage.prompt_tokens)
        m.inc("prefill_tokens", usage.prefilled_tokens)
        m.inc("generation_tokens", usage.generated_tokens)
        m.inc("cache_queries", usage.prompt_tokens)
        m.inc("cache_hits", usage.cached_tokens)
        m.inc("session_hits" if usage.cached_tokens else "session_misses")
        m.inc("takeovers", finish_reason=finish)
        stats = self._model().cache_stats()
        m.set("session_evictions", stats.evictions)
        m.set("cache_bytes", stats.bytes)
        m.set("sessions", len(self.sessions))
        extra: dict[str, Any] = {"text": committed} if self.log_prompts else {}
        self.calls.log(
            call,
            "takeover",
            finish_reason=finish,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            prefilled_tokens=usage.prefilled_tokens,
            generated_tokens=usage.generated_tokens,
            queue_s=round(queue_s, 4),
            total_s=round(elapsed, 4),
            **extra,
        )

    def Prefill(
        self, request: pb.PrefillRequest, context: grpc.ServicerContext
    ) -> pb.PrefillResponse:
        call = self.calls.begin("Prefill", context)

        def work() -> pb.PrefillResponse:
            req = parsed(request)
            acc, _ = self._accept(context, call, req.session_id, text_from_pb(req), lambda: None)
            try:
                with self.admission.slot(acc.cost, acc.should_stop) as ticket:
                    self._gauge_load()
                    try:
                        done = self._model().prefill(
                            GenerateRequest(acc.key, acc.messages, acc.text), acc.should_stop
                        )
                    except EngineCancelled:
                        raise self._why_stopped(context, acc.superseded) from None
                    except EngineContextFull:  # nothing to warm: a takeover would say CONTEXT_FULL
                        raise errors.TextTooLong(
                            "text does not fit the model's context window"
                        ) from None
            finally:
                self._gauge_load()
            if acc.should_stop():
                raise self._why_stopped(context, acc.superseded)
            if not self.sessions.commit(acc.key, acc.turn, acc.messages, acc.text, acc.base):
                raise errors.Cancelled("superseded by a newer call on the same session")
            text = acc.text
            length, digest = text_digest(text)
            self.calls.log(
                call,
                "prefill",
                prompt_tokens=done.usage.prompt_tokens,
                cached_tokens=done.usage.cached_tokens,
                total_s=round(self.clock() - call.started, 4),
            )
            return pb.PrefillResponse(
                usage=usage_to_pb(done.usage),
                timings=pb.Timings(queue_s=ticket.queue_s, prefill_s=done.prefill_s),
                committed_length=length,
                committed_sha256=digest,
            )

        return self.calls.guard(context, call, work)

    def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        call = self.calls.begin("GetModelInfo", context)

        def work() -> pb.ModelInfo:
            parsed(request)
            self._authenticate(context, call)
            info = self._model().info
            return pb.ModelInfo(
                model_id=info.model_id,
                tokenizer=info.tokenizer,
                context_length=info.context_length,
                device=info.device,
                dtype=info.dtype,
                chat_template=info.chat_template,
                max_tokens_per_takeover=self.limits.max_tokens_per_takeover,
                max_text_chars=self.limits.max_text_chars,
                engine=info.engine,
                max_running=info.max_running,
            )

        return self.calls.guard(context, call, work)

    def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.ServicerContext
    ) -> pb.EndSessionResponse:
        call = self.calls.begin("EndSession", context)

        def work() -> pb.EndSessionResponse:
            key = self._session_key(context, call, parsed(request).session_id)
            existed = self.sessions.drop(key)
            if self.engine is not None:
                self.engine.drop(key)
            self.metrics.set("sessions", len(self.sessions))
            self.calls.log(call, "end_session", existed=existed)
            return pb.EndSessionResponse(existed=existed)

        return self.calls.guard(context, call, work)
