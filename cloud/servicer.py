"""The gRPC servicer: validation, auth, sessions, admission and the one-round-trip takeover.

It imports no torch: it drives any `cloud.engine_api.Engine`, so tests run it with a
scripted engine. Every error leaves through `_abort`, the one place where the shared
error tree becomes a gRPC status. Prompt text is never logged unless `log_prompts`.

A takeover, as `_takeover` runs it:
  check    -> auth, field validation, resolve the delta against the session's text
  queue    -> wait for the engine (bounded; RESOURCE_EXHAUSTED when full)
  write    -> stream the preamble, then the engine's n tokens
  verify   -> if the written text has a verification keyword, n2 more tokens, same call
  commit   -> record the session's new text, only if the caller is still there and the
              session's writer, then send the final message (the session keeps accepting
              the previous base too, in case that message never arrives)

A text that does not fit the model's context window is not an error: the takeover ends
normally with finish reason CONTEXT_FULL and what was written so far (nothing, when the
prompt alone does not fit), so the caller goes on without the cloud.

Logs are one JSON object per line with the request id (the caller's `x-request-id`
metadata when it sends a sane one, else a fresh one; echoed back in the initial
metadata), the session id and the caller's key id (never the key). Prompt and answer
text appear only with `log_prompts`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from cloud import validation
from cloud.admission import Admission
from cloud.auth import ANONYMOUS, ApiKeys
from cloud.engine_api import (
    Engine,
    EngineCancelled,
    EngineContextFull,
    EngineOutOfMemory,
    Generated,
)
from cloud.metrics import Metrics
from cloud.sessions import SessionStore, engine_key
from shared import errors
from shared.policy import continuation_keyword
from shared.rpc import specthink_pb2 as pb
from shared.rpc import specthink_pb2_grpc as rpc
from shared.wire import (
    FINISH_CONTEXT_FULL,
    FINISH_LENGTH,
    Message,
    Sampling,
    TakeoverDone,
    TextChunk,
    TextDelta,
    Timings,
    Usage,
    chunk_to_pb,
    done_to_pb,
    sampling_from_pb,
    text_digest,
    text_from_pb,
    usage_to_pb,
    write_from_pb,
)

log = logging.getLogger("specthink.cloud")
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")


@dataclass(frozen=True)
class Malformed:
    """A request protobuf refused to parse (see cloud.server's tolerant deserializers)."""

    reason: str


@dataclass
class CallLog:
    """Who asked what, for the JSON log lines of one RPC."""

    rpc: str
    request_id: str
    started: float
    fields: dict[str, Any] = field(default_factory=dict)


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex[:16]


def _parsed(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise errors.InvalidRequest(request.reason)
    return request


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

    # ---- logs, and the one place errors become statuses ---------------------------------

    def _begin(self, rpc_name: str, context: grpc.ServicerContext) -> CallLog:
        call = CallLog(rpc_name, _request_id(context), self.clock())
        with contextlib.suppress(Exception):  # the call may be gone: the id is a courtesy
            context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
        return call

    def _log(self, call: CallLog, event: str, **fields: Any) -> None:
        record = {
            "event": event,
            "rpc": call.rpc,
            "request_id": call.request_id,
            **call.fields,
            **fields,
        }
        log.info(json.dumps(record, ensure_ascii=False))

    def _abort(
        self,
        context: grpc.ServicerContext,
        error: errors.SpecThinkError,
        call: CallLog | None = None,
    ) -> None:
        code, message, trailers = errors.to_status(error)
        self.metrics.inc("errors", code=code.name)
        if call is not None:
            self._log(
                call,
                "error",
                code=code.name,
                message=message,
                total_s=round(self.clock() - call.started, 4),
            )
        if trailers:
            context.set_trailing_metadata(trailers)
        context.abort(code, message)

    def _guard(self, context: grpc.ServicerContext, call: CallLog, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except errors.SpecThinkError as exc:
            self._abort(context, exc, call)
        except Exception:
            log.exception("internal error in %s (request %s)", call.rpc, call.request_id)
            self._abort(context, errors.InternalError("internal error"), call)

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
        call = self._begin("Takeover", context)
        try:
            yield from self._takeover(_parsed(request), context, call)
        except errors.SpecThinkError as exc:
            self._abort(context, exc, call)
        except Exception:
            log.exception("internal error in Takeover (request %s)", call.request_id)
            self._abort(context, errors.InternalError("internal error"), call)
        finally:
            self._gauge_load()

    def _takeover(
        self, request: pb.TakeoverRequest, context: grpc.ServicerContext, call: CallLog
    ) -> Iterator[pb.TakeoverEvent]:
        # check
        key = self._session_key(context, call, request.session_id)
        body = validation.text(text_from_pb(request), self.limits)
        sampling = validation.sampling(sampling_from_pb(request.sampling))
        write = validation.write(write_from_pb(request.write), self.limits)
        self._refuse_when_draining()
        self._model()
        messages, text = self.sessions.resolve(key, body)
        validation.resolved_size(messages, text, self.limits)
        base = text[: len(text) - len(body.append)] if isinstance(body, TextDelta) else None
        call.fields["delta_chars"] = len(body.append) if isinstance(body, TextDelta) else None
        writer, superseded = self.sessions.begin_write(key, messages)
        should_stop = self._should_stop(context, superseded)
        # queue
        self.metrics.set("waiting", self.admission.waiting + 1)
        with self.admission.slot(len(text) // 4, should_stop) as ticket:
            self._gauge_load()
            self.metrics.observe("queue", ticket.queue_s)
            # write
            written = write.preamble
            if write.preamble:
                yield chunk_to_pb(TextChunk(write.preamble, 0))
            result = yield from self._generate(
                key,
                messages,
                text + written,
                write.max_tokens,
                sampling,
                write.stop,
                should_stop,
                context,
                superseded,
                call.started,
            )
            written += result.text
            usage, prefill_s, decode_s = result.usage, result.prefill_s, result.decode_s
            # verify: the continuation runs in the same call when a keyword was written
            continued_on = None
            if result.finish_reason == FINISH_LENGTH and write.continue_tokens:
                continued_on = continuation_keyword(result.text, write.continue_if)
            if continued_on:
                more = yield from self._generate(
                    key,
                    messages,
                    text + written,
                    write.continue_tokens,
                    sampling,
                    write.stop,
                    should_stop,
                    context,
                    superseded,
                    None,
                )
                written += more.text
                usage = Usage(
                    usage.prompt_tokens,
                    usage.cached_tokens,
                    usage.prefilled_tokens + more.usage.prefilled_tokens,
                    usage.generated_tokens + more.usage.generated_tokens,
                )
                prefill_s, decode_s = prefill_s + more.prefill_s, decode_s + more.decode_s
                result = more
        self._gauge_load()
        # commit: every chunk was handed to the transport while the caller was there;
        # nothing it will not receive is committed
        committed = text + written
        if should_stop():
            raise self._why_stopped(context, superseded)
        if not self.sessions.commit(key, writer, messages, committed, base):
            raise errors.Cancelled("superseded by a newer call on the same session")
        length, digest = text_digest(committed)
        yield done_to_pb(
            TakeoverDone(
                result.finish_reason,
                usage,
                Timings(ticket.queue_s, prefill_s, decode_s),
                continued_on,
                length,
                digest,
            )
        )
        self._account(call, usage, result.finish_reason, ticket.queue_s, committed)

    def _generate(
        self,
        key: str,
        messages: tuple[Message, ...],
        text: str,
        max_tokens: int,
        sampling: Sampling,
        stop: tuple[str, ...],
        should_stop: Callable[[], bool],
        context: grpc.ServicerContext,
        superseded: threading.Event,
        started: float | None,
    ) -> Generator[pb.TakeoverEvent, None, Generated]:
        """Stream the engine's chunks; the generator's return value is the Generated.

        A text that does not fit the context window ends the stretch normally with
        CONTEXT_FULL and what was streamed of it (nothing, if the prompt alone does not
        fit): the caller goes on without the cloud; it is not a bad request."""
        streamed, tokens = "", 0
        try:
            for item in self._model().generate(
                key, messages, text, max_tokens, sampling, stop, should_stop
            ):
                if isinstance(item, Generated):
                    return item
                if started is not None:
                    self.metrics.observe("ttft", self.clock() - started)
                    started = None
                streamed, tokens = streamed + item.text, tokens + item.tokens
                yield chunk_to_pb(item)
        except EngineCancelled:
            raise self._why_stopped(context, superseded) from None
        except EngineContextFull:
            return Generated(FINISH_CONTEXT_FULL, Usage(0, 0, 0, tokens), 0.0, 0.0, streamed)
        except EngineOutOfMemory:  # it ran out of device memory alone: try again later
            raise errors.Overloaded("the model ran out of device memory", 2.0) from None
        raise errors.InternalError("engine ended without a result")

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
        self._log(
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
        call = self._begin("Prefill", context)

        def work() -> pb.PrefillResponse:
            req = _parsed(request)
            key = self._session_key(context, call, req.session_id)
            body = validation.text(text_from_pb(req), self.limits)
            self._refuse_when_draining()
            engine = self._model()
            messages, text = self.sessions.resolve(key, body)
            validation.resolved_size(messages, text, self.limits)
            base = text[: len(text) - len(body.append)] if isinstance(body, TextDelta) else None
            writer, superseded = self.sessions.begin_write(key, messages)
            should_stop = self._should_stop(context, superseded)
            try:
                with self.admission.slot(len(text) // 4, should_stop) as ticket:
                    self._gauge_load()
                    try:
                        done = engine.prefill(key, messages, text, should_stop)
                    except EngineCancelled:
                        raise self._why_stopped(context, superseded) from None
                    except EngineContextFull:  # nothing to warm: a takeover would say CONTEXT_FULL
                        raise errors.TextTooLong(
                            "text does not fit the model's context window"
                        ) from None
            finally:
                self._gauge_load()
            if should_stop():
                raise self._why_stopped(context, superseded)
            if not self.sessions.commit(key, writer, messages, text, base):
                raise errors.Cancelled("superseded by a newer call on the same session")
            length, digest = text_digest(text)
            self._log(
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

        return self._guard(context, call, work)

    def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        call = self._begin("GetModelInfo", context)

        def work() -> pb.ModelInfo:
            _parsed(request)
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

        return self._guard(context, call, work)

    def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.ServicerContext
    ) -> pb.EndSessionResponse:
        call = self._begin("EndSession", context)

        def work() -> pb.EndSessionResponse:
            key = self._session_key(context, call, _parsed(request).session_id)
            existed = self.sessions.drop(key)
            if self.engine is not None:
                self.engine.drop(key)
            self.metrics.set("sessions", len(self.sessions))
            self._log(call, "end_session", existed=existed)
            return pb.EndSessionResponse(existed=existed)

        return self._guard(context, call, work)
