"""The device check's gRPC section: a real CloudServer around EngineThread on loopback,
clients through shared/rpc's stub, sessions taking over in rounds; the takeovers' latency
and cache use, summarised."""

from __future__ import annotations

import threading
import time
from typing import Any

from scripts.gpu_check_measure import filler, greedy
from scripts.gpu_check_report import percentile

TAKEOVER_TOKENS = 20
GRPC_SESSIONS = (1, 16)
GRPC_ROUNDS = 3
STRETCHES = (
    " The wind rose in the night and rattled the windows of the lamp room.",
    " By morning the sea was calm again, grey and flat as a slate.",
    " A fishing boat came in with its nets torn and its crew exhausted.",
)


def grpc_takeovers(engine: Any, tag: str) -> dict[str, Any]:
    """A CloudServer around EngineThread(engine) on 127.0.0.1, as `serve` runs it; for 1 and
    16 sessions at once, each session takes over GRPC_ROUNDS times (its full text, then that
    text + what it was written + a stretch of its own), through the stub of shared/rpc."""
    from cloud.engine_api import GenerateRequest
    from cloud.engine_thread import EngineThread
    from cloud.server import CloudServer, ServerOptions
    from shared.rpc import specthink_pb2 as pb
    from shared.rpc import specthink_pb2_grpc as pb_grpc
    from shared.wire import Message

    loop = EngineThread(engine)
    server = CloudServer(
        None, ServerOptions(host="127.0.0.1", port=0, reflection=False, max_waiting=64)
    )
    server.attach(loop)

    def warm_up() -> None:
        warm = GenerateRequest("__warmup__", (Message("user", "Hi"),), "", 2, greedy())
        for _ in loop.generate(warm, lambda: False):
            pass
        loop.drop(warm.session)

    opening = filler(engine.tokenizer, 60, seed=7)
    out: dict[str, Any] = {"address": server.address, "max_running": loop.max_running}
    try:
        server.start(warm_up=warm_up)
        for n in GRPC_SESSIONS:
            out[str(n)] = grpc_phase(server.address, n, opening, f"{tag}-grpc{n}", pb, pb_grpc)
    finally:
        server.stop_now()
        loop.close()
        thread = getattr(loop, "_thread", None)
        if thread is not None:
            thread.join(timeout=30)
        # nothing of the server may keep the engine (a paged pool is most of the device)
        server.engine = server.servicer.engine = None
    return out


def grpc_phase(
    address: str, sessions: int, opening: str, tag: str, pb: Any, pb_grpc: Any
) -> dict[str, Any]:
    """`sessions` clients at once, each on its own channel and session id."""
    import grpc

    records: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(sessions)

    def one(i: int) -> None:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.SpecThinkStub(channel)
        session = f"{tag}-{i}"
        text = f"({i}) {opening}"
        messages = [pb.ChatMessage(role="user", content="Continue the story.")]
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            barrier.wait(timeout=60)
            for r in range(GRPC_ROUNDS):
                request = pb.TakeoverRequest(
                    session_id=session,
                    full=pb.FullText(messages=messages, assistant_text=text),
                    sampling=pb.Sampling(temperature=0.0, top_p=1.0, top_k=0),
                    write=pb.WriteSpec(max_tokens=TAKEOVER_TOKENS),
                )
                started = time.perf_counter()
                first: float | None = None
                written = ""
                done = None
                for event in stub.Takeover(request, timeout=120):
                    if event.HasField("chunk"):
                        if first is None:
                            first = time.perf_counter() - started
                        written += event.chunk.text
                    else:
                        done = event.done
                wall = time.perf_counter() - started
                if done is None:
                    raise RuntimeError("the stream ended without its final message")
                with lock:
                    records.append(
                        {
                            "session": i,
                            "round": r,
                            "wall_s": wall,
                            "first_chunk_s": first,
                            "prompt": done.usage.prompt_tokens,
                            "cached": done.usage.cached_tokens,
                            "prefilled": done.usage.prefilled_tokens,
                            "generated": done.usage.generated_tokens,
                            "queue_s": done.timings.queue_s,
                            "prefill_s": done.timings.prefill_s,
                            "decode_s": done.timings.decode_s,
                        }
                    )
                text += written + STRETCHES[(i + r) % len(STRETCHES)]
            stub.EndSession(pb.EndSessionRequest(session_id=session), timeout=30)
        except Exception as exc:  # reported in the results, never hidden
            with lock:
                errors.append(f"session {i}: {type(exc).__name__}: {exc}"[:400])
        finally:
            channel.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return summarize_takeovers(sessions, records, errors)


def summarize_takeovers(
    sessions: int, records: list[dict[str, Any]], errors: list[str]
) -> dict[str, Any]:
    walls = [x["wall_s"] for x in records]
    first = [x for x in records if x["round"] == 0]
    later = [x for x in records if x["round"] > 0]
    return {
        "sessions": sessions,
        "rounds": GRPC_ROUNDS,
        "takeover_tokens": TAKEOVER_TOKENS,
        "takeovers": len(records),
        "p50_s": percentile(walls, 50),
        "p99_s": percentile(walls, 99),
        "prefilled_round_p50_s": percentile([x["wall_s"] for x in first], 50),
        "cached_rounds_p50_s": percentile([x["wall_s"] for x in later], 50),
        "first_chunk_p50_s": percentile(
            [x["first_chunk_s"] for x in records if x["first_chunk_s"] is not None], 50
        ),
        "generated": sum(x["generated"] for x in records),
        "prompt_tokens": sum(x["prompt"] for x in records),
        "cached_tokens": sum(x["cached"] for x in records),
        "prefilled_tokens": sum(x["prefilled"] for x in records),
        "later_rounds_cached_tokens": sum(x["cached"] for x in later),
        "later_rounds_prefilled_tokens": sum(x["prefilled"] for x in later),
        "errors": errors,
        "records": records,
    }
