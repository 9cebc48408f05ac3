"""The benchmark's rig and its small tools: one process holding the edge's llama.cpp model,
the cloud's engine behind a real `CloudServer` on a loopback port, and a gRPC client, plus
the interleaving, medians and the report every section of `scripts.bench` writes into."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---- small utilities ------------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def interleaved(pairs: int, a: Callable[[], Any], b: Callable[[], Any]) -> list[tuple[Any, Any]]:
    """A, B, B, A, A, B, ...: each pair sees about the same machine load, and neither side
    always goes first (a drifting load or a warm-up effect would favour one)."""
    out = []
    for i in range(pairs):
        if i % 2:
            y = b()
            x = a()
        else:
            x = a()
            y = b()
        out.append((x, y))
    return out


def rnd(x: float | None, n: int = 3) -> float | None:
    return None if x is None else round(x, n)


@dataclass
class Row:
    section: str
    figure: str
    value: str
    goal: str = ""
    status: str = "info"  # MET | NOT MET | info | SKIPPED | ERROR


@dataclass
class Report:
    quick: bool
    started: str = field(default_factory=lambda: dt.datetime.now().isoformat(timespec="seconds"))
    command: str = ""
    rows: list[Row] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    load: dict[str, list[float]] = field(default_factory=dict)

    def row(
        self, section: str, figure: str, value: str, goal: str = "", met: bool | None = None
    ) -> None:
        status = "info" if met is None else ("MET" if met else "NOT MET")
        self.rows.append(Row(section, figure, value, goal, status))


# ---- the rig: edge drafter, cloud engine, server, client ------------------------------


class Recording:
    """A CloudTransport around GrpcCloud that keeps, per takeover, the client-side wall
    time and the cloud's usage and timings (the session's Stats only keep sums)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[dict[str, Any]] = []
        self.prefills: list[dict[str, Any]] = []

    def takeover(self, call: Any) -> Iterator[Any]:
        from shared.wire import TakeoverDone, TextChunk

        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        for event in self.inner.takeover(call):
            if isinstance(event, TextChunk):
                tokens += event.tokens
                if first is None:
                    first = time.perf_counter() - started
            elif isinstance(event, TakeoverDone):
                u, t = event.usage, event.timings
                self.calls.append(
                    {
                        "wall_s": time.perf_counter() - started,
                        "first_chunk_s": first,
                        "tokens": tokens,
                        "prompt": u.prompt_tokens,
                        "cached": u.cached_tokens,
                        "prefilled": u.prefilled_tokens,
                        "generated": u.generated_tokens,
                        "queue_s": t.queue_s,
                        "prefill_s": t.prefill_s,
                        "decode_s": t.decode_s,
                        "delta": type(call.text).__name__ == "TextDelta",
                    }
                )
            yield event

    def prefill(self, session_id: str, text: Any) -> Any:
        started = time.perf_counter()
        result = self.inner.prefill(session_id, text)
        self.prefills.append({"wall_s": time.perf_counter() - started})
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Rig:
    def __init__(
        self,
        edge_model: Path,
        cloud_model: Path,
        log: Callable[[str], None],
        edge_threads: int | None = None,
        cloud_threads: int | None = None,
        engine_kind: str = "rows",
    ) -> None:
        from cloud.cli import _warm_up
        from cloud.engine import engine_class
        from cloud.engine_thread import EngineThread
        from cloud.server import CloudServer, ServerOptions
        from edge.drafter import LlamaDrafter

        self.log = log
        t0 = time.perf_counter()
        self.drafter = LlamaDrafter(edge_model, context_length=4096, threads=edge_threads)
        log(f"edge model loaded in {time.perf_counter() - t0:.1f} s: {edge_model.name}")
        t0 = time.perf_counter()
        self.engine = engine_class(engine_kind, "cpu").load(
            str(cloud_model), device="cpu", num_threads=cloud_threads
        )
        log(
            f"cloud model loaded in {time.perf_counter() - t0:.1f} s: {cloud_model.name} "
            f"({self.engine.info.dtype}, {self.engine.info.device}, engine {self.engine.info.engine})"
        )
        # as `specthink-cloud serve` does: all model work on one engine thread, admission
        # following its batch limit
        self.server = CloudServer(None, ServerOptions(port=0, reflection=False))
        self.loop = EngineThread(self.engine)  # "direct" calls go here, as the server's do
        self.server.attach(self.loop)
        self.server.start(warm_up=lambda: _warm_up(self.loop))
        self.address = self.server.address
        self.client = self.connect(self.address)

    def connect(self, address: str) -> Any:
        from edge.cloud_client import ClientOptions, GrpcCloud

        # CPU takeovers of 200+ tokens take minutes under load: no deadline in the way
        return GrpcCloud(
            ClientOptions(address=address, takeover_timeout_s=900.0, connect_timeout_s=10.0)
        )

    def close(self) -> None:
        self.client.close()
        self.server.server.stop(grace=0).wait()


def greedy() -> Any:
    from shared.wire import Sampling

    return Sampling(temperature=0.0, top_p=1.0, top_k=0, seed=None)


def user(prompt: str) -> list[Any]:
    from shared.wire import Message

    return [Message("user", prompt)]


def prefill_ahead_option() -> tuple[str, Any] | None:
    """The SessionOptions knob that pushes text ahead with the Prefill RPC, if present."""
    from edge.session import SessionOptions

    names = {f.name: f for f in dataclasses.fields(SessionOptions)}
    if "prefill_ahead" in names:
        return "prefill_ahead", True
    if "prefill_every" in names:
        return "prefill_every", 16
    return None


def run_session(
    rig: Rig,
    strategy: str,
    prompt: str,
    max_tokens: int,
    client: Any = None,
    policy_overrides: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `ask`, in process: SpeculativeSession + LlamaDrafter (+ GrpcCloud)."""
    from edge.cloud_session import CloudSession
    from edge.session import SessionOptions, SpeculativeSession
    from shared import policy, policy_config

    config = policy_config.config_from_mapping(
        {"mode": "non-reasoning", **(policy_overrides or {})}, policy.PolicyConfig()
    )
    transport = Recording(client or rig.client) if strategy != "edge" else None
    session_id = uuid.uuid4().hex
    cloud = CloudSession(transport, session_id) if transport is not None else None  # type: ignore[arg-type]
    options = SessionOptions(
        strategy=strategy, max_tokens=max_tokens, sampling=greedy(), policy=config, **(extra or {})
    )
    rig.drafter.llm.reset()  # every run starts with a cold edge KV cache, as a new `ask` does
    loop = SpeculativeSession(rig.drafter, cloud, options)
    started = time.perf_counter()
    answer = loop.run(user(prompt))
    wall = time.perf_counter() - started
    if transport is not None:
        (client or rig.client).end_session(session_id)
    s = answer.stats
    total = s.edge_tokens + s.cloud_tokens
    return {
        "strategy": strategy,
        "wall_s": wall,
        "tokens": total,
        "tok_s": total / wall,
        "edge_tokens": s.edge_tokens,
        "cloud_tokens": s.cloud_tokens,
        "cloud_share": s.cloud_tokens / total if total else 0.0,
        "takeovers": s.takeovers,
        "cloud_wait_s": s.cloud_wait_s,
        "edge_draft_s": s.edge_draft_s,
        "cloud_cached_tokens": s.cloud_cached_tokens,
        "cloud_prefill_tokens": s.cloud_prefill_tokens,
        "fallbacks": s.fallbacks,
        "finish": answer.finish_reason,
        "calls": transport.calls if transport is not None else [],
        "prefills": transport.prefills if transport is not None else [],
        "text_head": answer.text[:80],
    }


def prefill_work(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Prefilled tokens per token the cloud had not seen, from the usage of each takeover.

    Not seen by the cloud before call i: its prompt minus what it held after call i-1
    (that call's prompt plus what it generated); all of the first call's prompt."""
    prefilled = unseen = calls = 0
    per_call: list[float] = []
    for run in runs:
        held = 0
        for c in run["calls"]:
            new = max(0, c["prompt"] - held)
            prefilled += c["prefilled"]
            unseen += new
            calls += 1
            if new:
                per_call.append(c["prefilled"] / new)
            held = c["prompt"] + c["generated"]
    return {
        "prefilled": prefilled,
        "unseen": unseen,
        "calls": calls,
        "ratio": prefilled / unseen if unseen else None,
        "extra_per_call": (prefilled - unseen) / calls if calls else None,
        "per_call_median": median(per_call),
    }
