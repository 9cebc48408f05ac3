"""The concurrency section of the benchmark (issue 10): many edges at once on one cloud.

    .venv/bin/python -m scripts.bench --only concurrency [--quick]

N sessions (1, 4, 8 and 16), each with its own session id and so its own session cache
on the cloud, take over at the same time, as N laptops would: each sends its full text,
takes over `TAKEOVER` tokens (the paper's n1), appends a stretch of text of its own (the
edge's part) and takes over again, `rounds` times. Two engine loops over the SAME model
object run side by side in this process, each behind its own `CloudServer` on loopback:

  batched   `EngineThread` with its default batch limit (sized from memory): up to
            max_running takeovers decode together, one token each per step
  limit 1   `EngineThread(max_running=1)`: one takeover at a time, as the cloud ran
            before continuous batching (the "today" baseline, measured in this run)

Figures (all ratios of runs in this process, interleaved where paired):
  alone     one session: tok/s batched / tok/s limit 1 (goal >= 0.95: batching costs a
            takeover alone nothing)
  gain      aggregate tok/s with 8 sessions / tok/s of one session alone, both batched
            (goal >= 3x; 5x wanted)
  levels    per N: aggregate tok/s (tokens written by all sessions / wall time, prefill
            included), decode tok/s (tokens / time the loop spent in decode steps),
            takeover latency p50 / p99 (request to final message, queueing included)
  proto     the gain at 8 sessions as seen by `scripts.proto_only_client`, a client
            generated from proto/ alone, in its own process
  dtype     decode tok/s of the same model loaded in bfloat16 / in float32
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.bench_rig import prefill_work

ROOT = Path(__file__).resolve().parents[1]
TAKEOVER = 20
OPENING = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the "
    "steps as his father had taught him. There were one hundred and twelve of them."
)
STRETCHES = (
    " The wind rose in the night and rattled the windows of the lamp room.",
    " By morning the sea was calm again, grey and flat as a slate.",
    " A fishing boat came in with its nets torn and its crew exhausted.",
)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Side:
    name: str
    loop: Any  # cloud.engine_thread.EngineThread
    server: Any  # cloud.server.CloudServer

    @property
    def address(self) -> str:
        return str(self.server.address)


def make_side(engine: Any, name: str, max_running: int | None) -> Side:
    from cloud.cli import _warm_up
    from cloud.engine_thread import EngineThread
    from cloud.server import CloudServer, ServerOptions

    loop = EngineThread(engine, max_running=max_running)
    server = CloudServer(None, ServerOptions(port=0, reflection=False, max_waiting=64))
    server.attach(loop)  # admission follows the loop's batch limit
    server.start(warm_up=lambda: _warm_up(loop))
    return Side(name, loop, server)


def phase(side: Side, sessions: int, rounds: int, tokens: int = TAKEOVER) -> dict[str, Any]:
    """`sessions` edges at once through the project's client, each `rounds` takeovers."""
    from edge.cloud_client import ClientOptions, GrpcCloud
    from shared.wire import (
        FullText,
        Message,
        Sampling,
        TakeoverCall,
        TakeoverDone,
        TextChunk,
        WriteSpec,
    )

    tag = uuid.uuid4().hex[:8]
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(sessions)
    decoded0, decode_s0 = side.loop.decoded_tokens, side.loop.decode_s
    sizes0 = dict(side.loop.batch_sizes)

    def one(i: int) -> None:
        client = GrpcCloud(
            ClientOptions(address=side.address, takeover_timeout_s=900.0, connect_timeout_s=10.0)
        )
        session = f"conc-{tag}-{i}"
        text = f"({i}) {OPENING}"
        msgs = (Message("user", "Continue the story."),)
        try:
            client._connect()
            barrier.wait(timeout=60)
            for r in range(rounds):
                call = TakeoverCall(
                    session,
                    FullText(msgs, text),
                    Sampling(temperature=0.0, top_p=1.0, top_k=0),
                    WriteSpec(max_tokens=tokens),
                )
                started = time.perf_counter()
                written = ""
                for event in client.takeover(call):
                    if isinstance(event, TextChunk):
                        written += event.text
                    elif isinstance(event, TakeoverDone):
                        done = event
                ended = time.perf_counter()
                with lock:
                    records.append(
                        {
                            "session": i,
                            "round": r,
                            "started": started,
                            "ended": ended,
                            "latency_s": ended - started,
                            "prompt": done.usage.prompt_tokens,
                            "generated": done.usage.generated_tokens,
                            "prefilled": done.usage.prefilled_tokens,
                            "cached": done.usage.cached_tokens,
                            "queue_s": done.timings.queue_s,
                        }
                    )
                text += written + STRETCHES[(i + r) % len(STRETCHES)]
            client.end_session(session)
        except Exception as exc:  # reported in the results, never hidden
            with lock:
                errors.append(f"session {i}: {type(exc).__name__}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(side, sessions, rounds, records, errors, decoded0, decode_s0, sizes0)


def summarize(
    side: Side,
    sessions: int,
    rounds: int,
    records: list[dict[str, Any]],
    errors: list[str],
    decoded0: int,
    decode_s0: float,
    sizes0: dict[int, int],
) -> dict[str, Any]:
    wall = max(x["ended"] for x in records) - min(x["started"] for x in records)
    generated = sum(x["generated"] for x in records)
    decoded = side.loop.decoded_tokens - decoded0
    decode_s = side.loop.decode_s - decode_s0
    latencies = [x["latency_s"] for x in records]
    sizes = {k: v - sizes0.get(k, 0) for k, v in side.loop.batch_sizes.items()}
    steps = sum(sizes.values())
    return {
        "engine": side.name,
        "sessions": sessions,
        "rounds": rounds,
        "takeovers": len(records),
        "generated": generated,
        "wall_s": wall,
        "aggregate_tok_s": generated / wall if wall else 0.0,
        "decode_tok_s": decoded / decode_s if decode_s else 0.0,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "mean_batch": decoded / steps if steps else 0.0,
        "batch_sizes": {k: v for k, v in sorted(sizes.items()) if v},
        "errors": errors,
        "records": records,
    }


def session_runs(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each session of these phases as a run of its calls in order, the shape
    `scripts.bench_rig.prefill_work` counts (a session id is unique within its phase)."""
    return [
        {
            "calls": sorted(
                (x for x in p["records"] if x["session"] == session), key=lambda x: x["round"]
            )
        }
        for p in phases
        for session in sorted({x["session"] for x in p["records"]})
    ]


def proto_phase(side: Side, sessions: int, rounds: int) -> dict[str, Any]:
    """The same load from `scripts.proto_only_client`, a separate process that imports
    nothing of this project."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "proto_only_client.py"),
            "--address",
            side.address,
            "--sessions",
            str(sessions),
            "--rounds",
            str(rounds),
            "--tokens",
            str(TAKEOVER),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd="/",  # nothing of the project on its path
    )
    if proc.returncode != 0:
        raise RuntimeError(f"proto-only client failed: {proc.stderr[-500:] or proc.stdout[-500:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def bench_concurrency(rig: Any, rep: Any, quick: bool) -> None:
    levels = (1, 8) if quick else (1, 4, 8, 16)
    rounds = 1 if quick else 2
    pairs = 1 if quick else 3
    log: Callable[[str], None] = rig.log
    batched = make_side(rig.engine, "batched", None)
    limit1 = make_side(rig.engine, "limit 1", 1)
    out: dict[str, Any] = {
        "takeover_tokens": TAKEOVER,
        "rounds": rounds,
        "max_running": batched.loop.max_running,
        "memory": rig.engine.memory.describe(),
        "phases": [],
    }
    try:

        def run(side: Side, n: int) -> dict[str, Any]:
            r = phase(side, n, rounds)
            out["phases"].append(r)
            log(
                f"  concurrency {side.name} x{n}: {r['aggregate_tok_s']:.2f} tok/s aggregate, "
                f"decode {r['decode_tok_s']:.2f} tok/s, p50/p99 {r['latency_p50_s']:.1f}/"
                f"{r['latency_p99_s']:.1f} s, mean batch {r['mean_batch']:.1f}"
                + (f", ERRORS {r['errors']}" if r["errors"] else "")
            )
            return r

        run(batched, 1)  # warm both paths once
        alone: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for i in range(pairs):  # one session alone: batched vs limit 1, order alternating
            if i % 2 == 0:
                a = run(batched, 1)
                b = run(limit1, 1)
            else:
                b = run(limit1, 1)
                a = run(batched, 1)
            alone.append((a, b))
        by_level: dict[int, dict[str, Any]] = {1: alone[-1][0]}
        for n in levels[1:]:
            by_level[n] = run(batched, n)
        today_8 = run(limit1, 8) if not quick else None
        ratio_alone = statistics.median(
            a["aggregate_tok_s"] / b["aggregate_tok_s"] for a, b in alone
        )
        one = statistics.median(a["aggregate_tok_s"] for a, _ in alone)
        one_decode = statistics.median(a["decode_tok_s"] for a, _ in alone)
        gain = by_level[8]["aggregate_tok_s"] / one
        decode_gain = by_level[8]["decode_tok_s"] / one_decode
        crowded = [p for p in out["phases"] if p["engine"] == "batched" and p["sessions"] >= 8]
        out["prefill_work_8_16"] = prefill_work(session_runs(crowded))
        proto1 = proto_phase(batched, 1, rounds)
        proto8 = proto_phase(batched, 8, rounds)
        proto_gain = proto8["aggregate_tok_s"] / proto1["aggregate_tok_s"]
        out.update(
            {
                "alone_ratio": ratio_alone,
                "gain_8": gain,
                "decode_gain_8": decode_gain,
                "proto_only": {"1": proto1, "8": proto8, "gain_8": proto_gain},
                "today_8": today_8,
            }
        )
    finally:
        for side in (batched, limit1):
            side.server.stop_now()
            side.loop.close()
    rep.results["concurrency"] = out
    rep.row(
        "batching",
        f"one session alone: tok/s batched engine / limit 1 ({TAKEOVER}-tok takeovers, {pairs} pairs)",
        f"{ratio_alone:.3f}  ({one:.2f} tok/s batched)",
        ">= 0.95",
        ratio_alone >= 0.95,
    )
    rep.row(
        "batching",
        "8 sessions at once: aggregate tok/s / one session alone",
        f"{gain:.2f}x  ({by_level[8]['aggregate_tok_s']:.2f} vs {one:.2f} tok/s; decode "
        f"steps alone {decode_gain:.2f}x)",
        ">= 3x (5x wanted)",
        gain >= 3.0,
    )
    for n, r in sorted(by_level.items()):
        rep.row(
            "batching",
            f"  {n:>2} sessions: aggregate / decode tok/s, takeover p50 / p99",
            f"{r['aggregate_tok_s']:.2f} / {r['decode_tok_s']:.2f} tok/s, {r['latency_p50_s']:.1f} / "
            f"{r['latency_p99_s']:.1f} s (mean batch {r['mean_batch']:.1f})",
        )
    if today_8 is not None:
        rep.row(
            "batching",
            "   8 sessions, limit 1 (before): aggregate tok/s, takeover p50 / p99",
            f"{today_8['aggregate_tok_s']:.2f} tok/s, {today_8['latency_p50_s']:.1f} / "
            f"{today_8['latency_p99_s']:.1f} s",
        )
    pw = out["prefill_work_8_16"]
    if pw["ratio"] is not None:
        rep.row(
            "prefill",
            "prefilled / new tokens, 8 and 16 sessions running at once",
            f"{pw['ratio']:.3f}  ({pw['prefilled']} of {pw['unseen']} new tokens)",
            "<= 1.1",
            pw["ratio"] <= 1.1,
        )
    rep.row(
        "batching",
        "proto-only client: aggregate tok/s at 8 sessions / at 1",
        f"{proto_gain:.2f}x  ({proto8['aggregate_tok_s']:.2f} vs {proto1['aggregate_tok_s']:.2f} tok/s)",
        ">= 3x",
        proto_gain >= 3.0,
    )


def bench_dtype(rig: Any, rep: Any, quick: bool, cloud_model: Path) -> None:
    """bfloat16 vs float32 decode tok/s of the same model on this machine, interleaved."""
    import inspect

    from cloud.engine import TransformersEngine
    from cloud.engine_api import Generated, GenerateRequest
    from cloud.engine_thread import EngineThread
    from shared.wire import Message, Sampling

    if "dtype" not in inspect.signature(TransformersEngine.load).parameters:
        raise RuntimeError("TransformersEngine.load has no dtype parameter")
    engines = {
        name: rig.engine
        if rig.engine.info.dtype == name
        else TransformersEngine.load(str(cloud_model), device="cpu", dtype=name)
        for name in ("float32", "bfloat16")
    }
    msgs = [Message("user", "Write a long story about a lighthouse keeper.")]
    n, pairs = (16, 1) if quick else (32, 3)

    loops = {name: EngineThread(engine) for name, engine in engines.items()}

    def decode(name: str) -> dict[str, float]:
        loop = loops[name]
        key = f"dtype-{name}"
        ask = GenerateRequest(key, tuple(msgs), OPENING, 1, Sampling(temperature=0))
        list(loop.generate(ask, lambda: False))
        done = list(loop.generate(dataclasses.replace(ask, max_tokens=n), lambda: False))[-1]
        loop.drop(key)
        assert isinstance(done, Generated)
        tokens = done.usage.generated_tokens
        return {"tokens": tokens, "decode_s": done.decode_s, "tok_s": tokens / done.decode_s}

    runs = []
    for i in range(pairs):
        order = ("float32", "bfloat16") if i % 2 == 0 else ("bfloat16", "float32")
        got = {name: decode(name) for name in order}
        runs.append(got)
    ratio = statistics.median(r["bfloat16"]["tok_s"] / r["float32"]["tok_s"] for r in runs)
    f32 = statistics.median(r["float32"]["tok_s"] for r in runs)
    b16 = statistics.median(r["bfloat16"]["tok_s"] for r in runs)
    rep.results["dtype"] = {"tokens": n, "pairs": runs, "ratio_bf16_over_fp32": ratio}
    rep.row(
        "dtype",
        f"decode tok/s bfloat16 / float32, same model ({n} tok, {pairs} pairs)",
        f"{ratio:.2f}x  ({b16:.2f} vs {f32:.2f} tok/s)",
    )
