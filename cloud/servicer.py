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
              session's writer, then send the final message
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cloud import validation
from cloud.admission import Admission
from cloud.auth import ANONYMOUS, ApiKeys
from cloud.engine_api import Engine, EngineCancelled, EngineContextFull, Generated
from cloud.metrics import Metrics
from cloud.sessions import SessionStore, engine_key
from shared import errors
from shared.policy import continuation_keyword
from shared.rpc import specthink_pb2 as pb
from shared.rpc import specthink_pb2_grpc as rpc
from shared.wire import (
    FINISH_LENGTH,
    Message,
    Sampling,
    TakeoverDone,
    TextChunk,
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
_request_ids = itertools.count(1)


class SpecThinkServicer(rpc.SpecThinkServicer):
    def __init__(
        self,
        engine: Engine,
        *,
        admission: Admission,
        sessions: SessionStore,
        limits: validation.Limits | None = None,
        api_keys: ApiKeys | None = None,
        metrics: Metrics | None = None,
        log_prompts: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.engine = engine
        self.admission = admission
        self.sessions = sessions
        self.limits = limits or validation.Limits()
        self.api_keys = api_keys
        self.metrics = metrics or Metrics()
        self.log_prompts = log_prompts
        self.clock = clock
        self.stopping = threading.Event()  # set after the drain grace: stop work now

    # ---- the one place errors become statuses -----------------------------------------

    def _abort(self, context: grpc.ServicerContext, error: errors.SpecThinkError) -> None:
        code, message, trailers = errors.to_status(error)
        self.metrics.inc("errors", code=code.name)
        if trailers:
            context.set_trailing_metadata(trailers)
        context.abort(code, message)

    def _guard(self, context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except errors.SpecThinkError as exc:
            self._abort(context, exc)
        except Exception:
            log.exception("internal error")
            self._abort(context, errors.InternalError("internal error"))

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        if self.api_keys is None:
            return ANONYMOUS
        return self.api_keys.authenticate(context.invocation_metadata())

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

    def _why_stopped(self, context: grpc.ServicerContext, superseded: threading.Event) -> errors.SpecThinkError:
        if self.stopping.is_set():
            return errors.Unavailable("server is shutting down; resend to another replica")
        if superseded.is_set():
            return errors.Cancelled("superseded by a newer call on the same session")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return errors.DeadlineExceeded("deadline exceeded")
        return errors.Cancelled("cancelled by the client")

    # ---- RPCs ---------------------------------------------------------------------------

    def Takeover(self, request: pb.TakeoverRequest, context: grpc.ServicerContext) -> Iterator[pb.TakeoverEvent]:
        try:
            yield from self._takeover(request, context)
        except errors.SpecThinkError as exc:
            self._abort(context, exc)
        except Exception:
            log.exception("internal error in Takeover")
            self._abort(context, errors.InternalError("internal error"))

    def _takeover(self, request: pb.TakeoverRequest, context: grpc.ServicerContext) -> Iterator[pb.TakeoverEvent]:
        started = self.clock()
        request_id = next(_request_ids)
        key = engine_key(self._authenticate(context), validation.session_id(request.session_id))
        body = validation.text(text_from_pb(request), self.limits)
        sampling = validation.sampling(sampling_from_pb(request.sampling))
        write = validation.write(write_from_pb(request.write), self.limits)
        messages, text = self.sessions.resolve(key, body)
        writer, superseded = self.sessions.begin_write(key, messages)
        should_stop = self._should_stop(context, superseded)
        self.metrics.set("waiting", self.admission.waiting + 1)
        with self.admission.slot(len(text) // 4, should_stop) as ticket:
            self._gauge_load()
            self.metrics.observe("queue", ticket.queue_s)
            written = write.preamble
            if write.preamble:
                yield chunk_to_pb(TextChunk(write.preamble, 0))
            first = self._generate(key, messages, text + written, write.max_tokens, sampling,
                                   write.stop, should_stop, context, superseded, started)
            result = yield from first
            written += result.text
            usage, prefill_s, decode_s = result.usage, result.prefill_s, result.decode_s
            continued_on = None
            if result.finish_reason == FINISH_LENGTH and write.continue_tokens:
                continued_on = continuation_keyword(result.text, write.continue_if)
            if continued_on:
                more = yield from self._generate(key, messages, text + written,
                                                 write.continue_tokens, sampling, write.stop,
                                                 should_stop, context, superseded, None)
                written += more.text
                usage = Usage(usage.prompt_tokens, usage.cached_tokens,
                              usage.prefilled_tokens + more.usage.prefilled_tokens,
                              usage.generated_tokens + more.usage.generated_tokens)
                prefill_s, decode_s = prefill_s + more.prefill_s, decode_s + more.decode_s
                result = more
        self._gauge_load()
        committed = text + written
        if should_stop():  # nothing the caller will not receive is committed
            raise self._why_stopped(context, superseded)
        self.sessions.commit(key, writer, messages, committed)
        length, digest = text_digest(committed)
        yield done_to_pb(TakeoverDone(result.finish_reason, usage,
                                      Timings(ticket.queue_s, prefill_s, decode_s),
                                      continued_on, length, digest))
        self._account(request_id, key, usage, result.finish_reason, started, ticket.queue_s,
                      len(body.append) if hasattr(body, "append") else None, committed)

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
    ) -> Iterator[pb.TakeoverEvent]:
        """Stream the engine's chunks; the generator's return value is the Generated."""
        try:
            for item in self.engine.generate(key, messages, text, max_tokens, sampling, stop,
                                             should_stop):
                if isinstance(item, Generated):
                    return item
                if started is not None:
                    self.metrics.observe("ttft", self.clock() - started)
                    started = None
                yield chunk_to_pb(item)
        except EngineCancelled:
            raise self._why_stopped(context, superseded) from None
        except EngineContextFull:
            raise errors.InvalidRequest("text too long for the model's context window") from None
        raise errors.InternalError("engine ended without a result")

    def _gauge_load(self) -> None:
        self.metrics.set("running", self.admission.running)
        self.metrics.set("waiting", self.admission.waiting)

    def _account(self, request_id: int, key: str, usage: Usage, finish: str, started: float,
                 queue_s: float, delta_chars: int | None, committed: str) -> None:
        m = self.metrics
        elapsed = self.clock() - started
        m.observe("e2e", elapsed)
        m.inc("prompt_tokens", usage.prompt_tokens)
        m.inc("prefill_tokens", usage.prefilled_tokens)
        m.inc("generation_tokens", usage.generated_tokens)
        m.inc("cache_queries", usage.prompt_tokens)
        m.inc("cache_hits", usage.cached_tokens)
        m.inc("session_hits" if usage.cached_tokens else "session_misses")
        m.inc("takeovers", finish_reason=finish)
        stats = self.engine.cache_stats()
        m.set("session_evictions", stats.evictions)
        m.set("cache_bytes", stats.bytes)
        m.set("sessions", len(self.sessions))
        record: dict[str, Any] = {
            "event": "takeover", "request_id": request_id, "session": key.split("/", 1)[1],
            "key_id": key.split("/", 1)[0], "finish_reason": finish,
            "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
            "prefilled_tokens": usage.prefilled_tokens, "generated_tokens": usage.generated_tokens,
            "queue_s": round(queue_s, 4), "total_s": round(elapsed, 4),
            "delta_chars": delta_chars,
        }
        if self.log_prompts:
            record["text"] = committed
        log.info(json.dumps(record))

    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> pb.PrefillResponse:
        def work() -> pb.PrefillResponse:
            key = engine_key(self._authenticate(context), validation.session_id(request.session_id))
            body = validation.text(text_from_pb(request), self.limits)
            messages, text = self.sessions.resolve(key, body)
            writer, superseded = self.sessions.begin_write(key, messages)
            should_stop = self._should_stop(context, superseded)
            with self.admission.slot(len(text) // 4, should_stop) as ticket:
                try:
                    done = self.engine.prefill(key, messages, text, should_stop)
                except EngineCancelled:
                    raise self._why_stopped(context, superseded) from None
                except EngineContextFull:
                    raise errors.InvalidRequest("text too long for the model's context window") from None
            self.sessions.commit(key, writer, messages, text)
            length, digest = text_digest(text)
            return pb.PrefillResponse(
                usage=usage_to_pb(done.usage),
                timings=pb.Timings(queue_s=ticket.queue_s, prefill_s=done.prefill_s),
                committed_length=length, committed_sha256=digest,
            )

        return self._guard(context, work)

    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        def work() -> pb.ModelInfo:
            self._authenticate(context)
            info = self.engine.info
            return pb.ModelInfo(
                model_id=info.model_id, tokenizer=info.tokenizer,
                context_length=info.context_length, device=info.device, dtype=info.dtype,
                chat_template=info.chat_template,
                max_tokens_per_takeover=self.limits.max_tokens_per_takeover,
                max_text_chars=self.limits.max_text_chars,
            )

        return self._guard(context, work)

    def EndSession(self, request: pb.EndSessionRequest, context: grpc.ServicerContext) -> pb.EndSessionResponse:
        def work() -> pb.EndSessionResponse:
            key = engine_key(self._authenticate(context), validation.session_id(request.session_id))
            existed = self.sessions.drop(key)
            self.engine.drop(key)
            return pb.EndSessionResponse(existed=existed)

        return self._guard(context, work)
