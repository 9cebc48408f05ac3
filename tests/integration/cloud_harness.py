"""A real `CloudServer` on 127.0.0.1 around a scripted engine, for the service tests.

`ScriptedEngine` implements exactly `cloud.engine_api.Engine`: it "prefills" in chunks
and "decodes" one scripted token per step, with controllable delays, checking
should_stop() between prefill chunks and before every decode step like the real engine.
It records what it saw (`events`), so tests can assert when and where it stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from cloud.engine_api import (
    CacheStats,
    EngineCancelled,
    EngineInfo,
    Generated,
    GenerateRequest,
    Prefilled,
    ShouldStop,
)
from cloud.server import CloudServer, ServerOptions
from shared.rpc import specthink_pb2 as pb
from shared.rpc import specthink_pb2_grpc as rpc
from shared.wire import (
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_STOP_STRING,
    Message,
    TextChunk,
    Usage,
    text_digest,
)

INFO = EngineInfo("scripted-model", "ScriptedTokenizer/100", 4096, "cpu", "float32", True)


@dataclass
class EngineEvent:
    kind: str  # "start" | "prefill" | "token" | "stopped" | "closed" | "done"
    session: str
    at: float
    detail: Any = None


@dataclass
class EngineCall:
    session: str
    messages: tuple[Message, ...]
    assistant_text: str
    max_tokens: int
    at: float


@dataclass
class ScriptedEngine:
    """Implements `cloud.engine_api.Engine` with no model: writes `tokens` cyclically, one
    per decode step, checking should_stop() where the real engine does.

    `gate`: decoding waits for it (polling should_stop) before every token from index
    `gate_from` on; `prefill_gate`: the same before every prefill chunk from `prefill_gate_from` on; `refuse`:
    errors raised by the next calls instead of writing (None: write; EngineContextFull
    too); `scripts`: per call, the tokens that call writes (then `tokens`); `on_call`: run
    at the start of each call (with its index); `drop_delay_s`: EndSession takes this long. The "KV cache" is the
    flattened text per session, so cached tokens follow the common prefix like the real one.
    """

    tokens: Sequence[str] = ("Hello", " there", ",", " friend", ".")
    token_delay_s: float = 0.0
    prefill_chunks: int = 0
    prefill_delay_s: float = 0.0
    end_after: int | None = None  # end of sequence after this many tokens
    gate: threading.Event | None = None
    gate_from: int = 0
    prefill_gate: threading.Event | None = None
    prefill_gate_from: int = 0
    refuse: list[Exception | None] = field(default_factory=list)
    scripts: list[Sequence[str]] = field(default_factory=list)
    on_call: Callable[[int], None] | None = None
    drop_delay_s: float = 0.0
    info: EngineInfo = INFO
    events: list[EngineEvent] = field(default_factory=list)
    calls: list[EngineCall] = field(default_factory=list)
    # calls that ended unfinished, by should_stop() or by the server closing the generator
    stopped: list[tuple[str, int]] = field(default_factory=list)  # (session, tokens written)
    dropped: list[str] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    first_token: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    _held: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _hits: int = 0
    _misses: int = 0

    def _record(self, kind: str, session: str, detail: Any = None) -> None:
        with self._lock:
            self.events.append(EngineEvent(kind, session, time.monotonic(), detail))

    def of(self, kind: str, session: str | None = None) -> list[EngineEvent]:
        with self._lock:
            return [e for e in self.events if e.kind == kind and session in (None, e.session)]

    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int:
        return len(_flat(messages, assistant_text)) // 4 + 1

    def _usage(self, session: str, messages: Sequence[Message], text: str, n: int) -> Usage:
        flat = _flat(messages, text)
        with self._lock:
            held = self._held.get(session, "")
            common = next(
                (i for i, (a, b) in enumerate(zip(held, flat, strict=False)) if a != b),
                min(len(held), len(flat)),
            )
            prompt = len(flat) // 4 + 1
            cached = min(prompt - 1, common // 4)
            self._hits += bool(cached)
            self._misses += not cached
        return Usage(prompt, cached, prompt - cached, n)

    def _prefill(self, session: str, should_stop: ShouldStop) -> None:
        for i in range(self.prefill_chunks):
            while (
                i >= self.prefill_gate_from
                and self.prefill_gate is not None
                and not self.prefill_gate.wait(0.01)
            ):
                if should_stop():
                    break
            if should_stop():
                self._record("stopped", session, ("prefill", i))
                raise EngineCancelled()
            self._record("prefill", session, i)
            time.sleep(self.prefill_delay_s)

    def generate(
        self, request: GenerateRequest, should_stop: ShouldStop
    ) -> Iterator[TextChunk | Generated]:
        r = request
        return self._generate(
            r.session, r.messages, r.assistant_text, r.max_tokens, r.stop, should_stop
        )

    def _generate(
        self,
        session: str,
        messages: Sequence[Message],
        assistant_text: str,
        max_tokens: int,
        stop: Sequence[str],
        should_stop: ShouldStop,
    ) -> Iterator[TextChunk | Generated]:
        index = len(self.calls)
        self.calls.append(
            EngineCall(session, tuple(messages), assistant_text, max_tokens, time.monotonic())
        )
        if self.on_call is not None:
            self.on_call(index)
        failure = self.refuse.pop(0) if self.refuse else None
        if failure is not None:
            raise failure
        tokens = self.scripts.pop(0) if self.scripts else self.tokens
        self._record("start", session, assistant_text)
        self.started.set()
        written, finish, n = "", FINISH_LENGTH, 0
        try:
            self._prefill(session, should_stop)
            for i in range(max_tokens):
                while i >= self.gate_from and self.gate is not None and not self.gate.wait(0.01):
                    if should_stop():
                        break
                if should_stop():
                    self._record("stopped", session, ("decode", i))
                    raise EngineCancelled()
                time.sleep(self.token_delay_s)
                token = tokens[i % len(tokens)]
                written += token
                n += 1
                self._record("token", session, i)
                yield TextChunk(token, 1)
                self.first_token.set()
                if any(s in written for s in stop):
                    finish = FINISH_STOP_STRING
                    break
                if self.end_after is not None and i + 1 >= self.end_after:
                    finish = FINISH_STOP
                    break
        except (EngineCancelled, GeneratorExit):
            # should_stop() said so, or the server stopped pulling (the call is gone)
            self.stopped.append((session, n))
            self._record("closed", session)
            raise
        usage = self._usage(session, messages, assistant_text, n)
        with self._lock:
            self._held[session] = _flat(messages, assistant_text + written)
        self._record("done", session, written)
        self.finished.set()
        yield Generated(finish, usage, 0.001, 0.002, written)

    def prefill(self, request: GenerateRequest, should_stop: ShouldStop) -> Prefilled:
        session, messages, assistant_text = (
            request.session,
            request.messages,
            request.assistant_text,
        )
        self._prefill(session, should_stop)
        usage = self._usage(session, messages, assistant_text, 0)
        with self._lock:
            self._held[session] = _flat(messages, assistant_text)
        return Prefilled(usage, 0.001)

    def drop(self, session: str) -> bool:
        time.sleep(self.drop_delay_s)
        self.dropped.append(session)
        with self._lock:
            return self._held.pop(session, None) is not None

    def cache_stats(self) -> CacheStats:
        with self._lock:
            held = len(self._held)
            return CacheStats(held, 1000 * held, self._hits, self._misses, 0)


def _flat(messages: Sequence[Message], text: str) -> str:
    return "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>" + text


@contextmanager
def running_server(
    engine: ScriptedEngine | None = None,
    *,
    start: bool = True,
    **options: Any,
) -> Iterator[CloudServer]:
    """A started CloudServer on 127.0.0.1 (a free port) around `engine`."""
    opts = replace(ServerOptions(host="127.0.0.1", port=0, drain_grace_s=5.0), **options)
    server = CloudServer(engine or ScriptedEngine(), opts)
    try:
        if start:
            server.start()
        yield server
    finally:
        server.stop_now()


def stub(
    address: str, credentials: grpc.ChannelCredentials | None = None, **channel_options: Any
) -> tuple[grpc.Channel, rpc.SpecThinkStub]:
    opts = list(channel_options.items())
    channel = (
        grpc.secure_channel(address, credentials, options=opts)
        if credentials
        else grpc.insecure_channel(address, options=opts)
    )
    return channel, rpc.SpecThinkStub(channel)


def full_request(
    session: str = "s1",
    text: str = "",
    *,
    user: str = "What is 2+2?",
    max_tokens: int = 5,
    **write: Any,
) -> pb.TakeoverRequest:
    req = pb.TakeoverRequest(session_id=session)
    req.full.messages.add(role="user", content=user)
    req.full.assistant_text = text
    req.write.max_tokens = max_tokens
    for k, v in write.items():
        if isinstance(v, list):
            getattr(req.write, k).extend(v)
        else:
            setattr(req.write, k, v)
    return req


def delta_request(
    session: str, base: str, append: str, *, max_tokens: int = 5
) -> pb.TakeoverRequest:
    length, digest = text_digest(base)
    req = pb.TakeoverRequest(session_id=session)
    req.delta.base_length = length
    req.delta.base_sha256 = digest
    req.delta.append = append
    req.write.max_tokens = max_tokens
    return req


def collect(events: Iterator[pb.TakeoverEvent]) -> tuple[str, pb.TakeoverDone]:
    text, done = "", None
    for event in events:
        if event.WhichOneof("event") == "chunk":
            text += event.chunk.text
        else:
            done = event.done
    assert done is not None, "stream ended without a done message"
    return text, done


def write_key_file(tmp: Path, *keys: str) -> Path:
    path = tmp / "keys.txt"
    path.write_text("# test keys\n" + "\n".join(keys) + "\n", encoding="utf-8")
    return path


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]
