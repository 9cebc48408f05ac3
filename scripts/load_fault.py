"""Load and fault run: 16 concurrent edge sessions against one real cloud, which is killed
with SIGKILL mid-run and restarted on the same port.

    .venv/bin/python -m scripts.load_fault [--sessions 16] [--max-tokens 120] [--kill-after 6]
    .venv/bin/python -m scripts.load_fault --no-baseline     # the batched cloud only

By default the whole run is made twice, one after the other, and reported side by side:
"before" with `serve --max-running 1` (one takeover at a time, as the cloud ran before
continuous batching) and "after" with the cloud's default batch limit (sized from memory).

What runs, all on this machine's CPU:
  cloud  a real `specthink-cloud serve` process on SmolLM2-135M (transformers, fp32);
  edge   16 threads, each the real edge loop (`edge.session.SpeculativeSession` +
         `edge.cloud_client.GrpcCloud`, one channel per session as 16 laptops would have),
         non-reasoning mode, temperature 0, ~120 tokens each. The small model is ONE shared
         `edge.drafter.LlamaDrafter` on SmolLM2 (GGUF) behind a lock, since llama.cpp is
         not thread-safe: edge drafting is serialized, which is slower than 16 laptops but
         the cloud sees the same traffic.
  fault  after `--kill-after` successful takeovers, SIGKILL the cloud, then restart it on
         the same port. Calls in flight fail (the edge retries, then writes locally); later
         deltas meet a cloud that holds nothing and are answered FAILED_PRECONDITION, and
         the edge resends the full text.

Every session must end with a complete answer (finish "length" at its budget or "stop").
Reports p50/p99 takeover latency, rejected requests (RESOURCE_EXHAUSTED), sessions recovered
(full-text resends, local fallbacks) and the wall time; prints a table and writes
bench-results/load_fault.json. Stops by itself within `--budget-s` (default 300 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge import bundled
from edge.answer import Answer
from edge.cloud_client import ClientOptions, GrpcCloud
from edge.cloud_session import CloudSession
from edge.drafter_api import DraftToken
from edge.session import SessionOptions, SpeculativeSession
from shared import errors
from shared.policy import Mode, PolicyConfig
from shared.wire import JudgeVerdict, Message, Sampling, TakeoverCall, TakeoverDone, TextChunk

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = [
    "Explain why the sky is blue.",
    "Give three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Describe how a bicycle works.",
    "Why do we have seasons on Earth?",
    "Write a short note about the history of tea.",
    "How does a refrigerator keep food cold?",
    "What makes a good night's sleep?",
]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the cloud process ----------------------------------------------------------------


class Cloud:
    """`specthink-cloud serve` on a fixed port; start, SIGKILL, restart."""

    def __init__(
        self,
        model: Path,
        port: int,
        log_dir: Path,
        max_waiting: int,
        max_running: int = 0,
        threads: int = 0,
    ) -> None:
        self.threads = threads  # torch threads of the cloud (OMP_NUM_THREADS); 0: torch's
        self.model, self.port, self.log_dir, self.max_waiting = model, port, log_dir, max_waiting
        self.max_running = max_running  # 0: the cloud's default (sized from memory)
        self.name = f"limit{max_running}" if max_running else "batched"
        self.process: subprocess.Popen[str] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 120.0) -> float:
        started = time.monotonic()
        self.starts += 1
        log = (self.log_dir / f"cloud-{self.name}-{self.starts}.log").open("w")
        self.process = subprocess.Popen(
            [
                str(BIN / "specthink-cloud"),
                "serve",
                "--model",
                str(self.model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--device",
                "cpu",
                "--max-waiting",
                str(self.max_waiting),
                "--drain-grace-s",
                "5",
                "--max-running",
                str(self.max_running),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                **({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}),
            },
        )
        assert self.process.stdout is not None
        ready: list[str] = []
        reader = threading.Thread(
            target=lambda: ready.append(self.process.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout_s)
        if not ready or not re.search(r"listening on", ready[0]):
            self.kill()
            raise RuntimeError(f"cloud did not start; see {log.name}")
        return time.monotonic() - started

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


# ---- the edge side --------------------------------------------------------------------


class LockedDrafter:
    """One llama.cpp model shared by the sessions, one draft at a time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = threading.Lock()

    def draft(
        self, messages: Sequence[Message], text: str, max_tokens: int, sampling: Sampling
    ) -> Iterator[DraftToken]:
        with self.lock:
            tokens = self.inner.draft(messages, text, max_tokens, sampling)
            try:
                yield from tokens
            finally:
                tokens.close()


@dataclass
class Tally:
    """What all sessions' transports saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    first_chunk: list[float] = field(default_factory=list)
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    rejected: int = 0  # RESOURCE_EXHAUSTED answers, retries included
    kill_after: int = 0
    restarted_at: float | None = None  # perf_counter of the restart
    ok_after_restart: int = 0
    killed: threading.Event = field(default_factory=threading.Event)
    kill_now: threading.Event = field(default_factory=threading.Event)


class CountingCloud(GrpcCloud):
    """GrpcCloud that counts every RESOURCE_EXHAUSTED answer (retried ones included)."""

    tally: Tally

    def _stream(
        self, call: TakeoverCall, *args: Any
    ) -> Iterator[TextChunk | JudgeVerdict | TakeoverDone]:
        try:
            yield from super()._stream(call, *args)
        except errors.Overloaded:
            with self.tally.lock:
                self.tally.rejected += 1
            raise


class TimedTransport:
    """Times each takeover (request to final message) and triggers the kill."""

    def __init__(self, inner: GrpcCloud, tally: Tally) -> None:
        self.inner, self.tally = inner, tally

    def takeover(self, call: TakeoverCall) -> Iterator[TextChunk | JudgeVerdict | TakeoverDone]:
        started = time.perf_counter()
        first = True
        try:
            for event in self.inner.takeover(call):
                if first and isinstance(event, TextChunk):
                    with self.tally.lock:
                        self.tally.first_chunk.append(time.perf_counter() - started)
                    first = False
                if isinstance(event, TakeoverDone):
                    with self.tally.lock:
                        self.tally.latencies.append(time.perf_counter() - started)
                        self.tally.ok += 1
                        if (
                            self.tally.restarted_at is not None
                            and started > self.tally.restarted_at
                        ):
                            self.tally.ok_after_restart += 1
                        if self.tally.ok >= self.tally.kill_after:
                            self.tally.kill_now.set()
                yield event
        except errors.SpecThinkError as exc:
            with self.tally.lock:
                name = type(exc).__name__
                self.tally.failed[name] = self.tally.failed.get(name, 0) + 1
            raise


@dataclass
class SessionResult:
    index: int
    answer: Answer | None = None
    error: str | None = None


def run_session(
    index: int,
    drafter: LockedDrafter,
    address: str,
    tally: Tally,
    max_tokens: int,
    policy: PolicyConfig,
    result: SessionResult,
) -> None:
    grpc_cloud = CountingCloud(
        ClientOptions(address=address, takeover_timeout_s=120.0, connect_timeout_s=3.0)
    )
    grpc_cloud.tally = tally
    transport = TimedTransport(grpc_cloud, tally)
    session_id = f"load-{index}-{os.getpid()}"
    options = SessionOptions(
        strategy="speculative",
        max_tokens=max_tokens,
        sampling=Sampling(temperature=0.0),
        policy=policy,
    )
    loop = SpeculativeSession(drafter, CloudSession(transport, session_id), options)  # type: ignore[arg-type]
    try:
        result.answer = loop.run([Message("user", PROMPTS[index % len(PROMPTS)])])
    except Exception as exc:  # reported, never hidden
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        grpc_cloud.end_session(session_id)
        grpc_cloud.close()


def complete(answer: Answer | None, max_tokens: int) -> bool:
    if answer is None or not answer.text:
        return False
    tokens = answer.stats.edge_tokens + answer.stats.cloud_tokens
    joined = "".join(s.text for s in answer.segments) == answer.text
    return joined and (
        answer.finish_reason == "stop"
        or (answer.finish_reason == "length" and tokens >= max_tokens)
    )


# ---- the run --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument(
        "--kill-after",
        type=int,
        default=10,
        help="SIGKILL the cloud after this many successful takeovers",
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=8,
        help="the cloud's admission queue (small, so that some are refused)",
    )
    parser.add_argument(
        "--start-tokens",
        type=int,
        default=40,
        help="the cloud's opening in non-reasoning mode (paper: 100; smaller "
        "here so 16 sessions fit a CPU-only run)",
    )
    parser.add_argument("--takeover-tokens", type=int, default=20, help="n1 (paper: 20)")
    parser.add_argument(
        "--breaker-cooldown-s",
        type=float,
        default=5.0,
        help="the edge's circuit-breaker cooldown (edge default 15 s; shorter "
        "here so sessions of ~120 tokens get back to the restarted cloud)",
    )
    parser.add_argument("--budget-s", type=float, default=300.0, help="per run")
    parser.add_argument(
        "--max-running",
        type=int,
        default=0,
        help="the batched cloud's batch limit (0: its default, sized from memory)",
    )
    parser.add_argument(
        "--cloud-threads",
        type=int,
        default=1,
        help="torch threads of the cloud (0: torch's default, one per core). The cloud "
        "and the 16 edge sessions share this machine's cores; 1 keeps the cloud's "
        "OpenMP threads from waiting on cores the edge holds (both runs alike)",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first run the same load against `--max-running 1` (before batching)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "load_fault.json")
    args = parser.parse_args(argv)

    model = bundled.default_edge_model()
    if model is None:
        print("load_fault: SmolLM2 is not installed (scripts/install.sh)", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    if args.baseline:
        runs["before"] = run_once(args, model, max_running=1)
    runs["after"] = run_once(args, model, max_running=args.max_running)
    after = runs["after"]
    report: dict[str, Any] = {**after, "runs": runs}
    if "before" in runs:
        before = runs["before"]
        report["p99_after_over_before"] = round(
            after["takeover_latency_p99_s"] / before["takeover_latency_p99_s"], 3
        )
        report["p50_after_over_before"] = round(
            after["takeover_latency_p50_s"] / before["takeover_latency_p50_s"], 3
        )
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_table(runs)
    if "before" in runs:
        print(
            f"\np99 takeover latency after / before: {report['p99_after_over_before']} "
            f"(p50: {report['p50_after_over_before']})"
        )
    print(f"\nwrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0 if all(r["all_complete"] for r in runs.values()) else 1


def run_once(args: argparse.Namespace, model: Path, max_running: int) -> dict[str, Any]:
    """One whole load-and-fault run against a cloud with this batch limit."""
    from edge.drafter import LlamaDrafter

    wall_started = time.monotonic()
    deadline = wall_started + args.budget_s
    port = free_port()
    cloud = Cloud(model, port, args.out.parent, args.max_waiting, max_running, args.cloud_threads)
    tally = Tally(kill_after=args.kill_after)
    print(f"load_fault: starting the cloud ({cloud.name}) on 127.0.0.1:{port} ...", file=sys.stderr)
    first_start_s = cloud.start()
    drafter = LockedDrafter(LlamaDrafter(model, context_length=2048, seed=0))
    policy = PolicyConfig(
        mode=Mode.NON_REASONING,
        start_tokens=args.start_tokens,
        takeover_tokens=args.takeover_tokens,
    )
    results = [SessionResult(i) for i in range(args.sessions)]
    threads = [
        threading.Thread(
            target=run_session,
            name=f"session-{i}",
            daemon=True,
            args=(i, drafter, f"127.0.0.1:{port}", tally, args.max_tokens, policy, r),
        )
        for i, r in enumerate(results)
    ]
    sessions_started = time.monotonic()
    for t in threads:
        t.start()

    restart_s = None
    killed_at = None
    while not tally.kill_now.wait(0.2):
        if time.monotonic() > deadline or not any(t.is_alive() for t in threads):
            break
    if tally.kill_now.is_set():
        killed_at = time.monotonic() - sessions_started
        print(
            f"load_fault: SIGKILL the cloud after {tally.ok} takeovers ({killed_at:.1f} s in)",
            file=sys.stderr,
        )
        cloud.kill()
        time.sleep(1.0)
        restart_s = cloud.start()
        tally.restarted_at = time.perf_counter()
        print(f"load_fault: cloud restarted on the same port in {restart_s:.1f} s", file=sys.stderr)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    timed_out = any(t.is_alive() for t in threads)
    exit_code = cloud.stop()
    wall_s = time.monotonic() - wall_started

    answers = [r.answer for r in results if r.answer is not None]
    done = [complete(r.answer, args.max_tokens) for r in results]
    report: dict[str, Any] = {
        "sessions": args.sessions,
        "max_tokens": args.max_tokens,
        "mode": "non-reasoning",
        "start_tokens": args.start_tokens,
        "takeover_tokens": args.takeover_tokens,
        "temperature": 0.0,
        "drafter": "one shared LlamaDrafter (SmolLM2-135M GGUF) behind a lock",
        "cloud": "specthink-cloud serve, SmolLM2-135M via transformers, CPU fp32, "
        + (f"--max-running {max_running}" if max_running else "default batch limit"),
        "max_running": max_running or None,
        "cloud_threads": args.cloud_threads or None,
        "complete_answers": sum(done),
        "all_complete": all(done) and not timed_out,
        "timed_out": timed_out,
        "takeovers_ok": tally.ok,
        "takeovers_ok_after_restart": tally.ok_after_restart,
        "breaker_cooldown_s": args.breaker_cooldown_s,
        "takeover_latency_p50_s": round(percentile(tally.latencies, 50), 3),
        "takeover_latency_p99_s": round(percentile(tally.latencies, 99), 3),
        "takeover_latencies_s": sorted(round(x, 2) for x in tally.latencies),
        "first_chunk_p50_s": round(percentile(tally.first_chunk, 50), 3),
        "first_chunk_p99_s": round(percentile(tally.first_chunk, 99), 3),
        "takeovers_failed": tally.failed,
        "rejected_resource_exhausted": tally.rejected,
        "full_text_resends": sum(a.stats.full_text_resends for a in answers),
        "sessions_with_full_text_resend": sum(a.stats.full_text_resends > 0 for a in answers),
        "local_fallbacks": sum(a.stats.fallbacks for a in answers),
        "sessions_with_fallback": sum(a.stats.fallback for a in answers),
        "sessions_recovered": sum(
            a.stats.fallback or a.stats.full_text_resends > 0 for a in answers
        ),
        "cloud_tokens": sum(a.stats.cloud_tokens for a in answers),
        "edge_tokens": sum(a.stats.edge_tokens for a in answers),
        "killed_after_s": round(killed_at, 2) if killed_at is not None else None,
        "cloud_first_start_s": round(first_start_s, 2),
        "cloud_restart_s": round(restart_s, 2) if restart_s is not None else None,
        "cloud_exit_code_after_sigterm": exit_code,
        "wall_s": round(wall_s, 2),
        "per_session": [
            {
                "session": r.index,
                "complete": d,
                "error": r.error,
                "finish_reason": r.answer.finish_reason if r.answer else None,
                "tokens": (r.answer.stats.edge_tokens + r.answer.stats.cloud_tokens)
                if r.answer
                else 0,
                "cloud_tokens": r.answer.stats.cloud_tokens if r.answer else 0,
                "full_text_resends": r.answer.stats.full_text_resends if r.answer else 0,
                "fallbacks": r.answer.stats.fallbacks if r.answer else 0,
                "wall_s": round(r.answer.stats.wall_s, 2) if r.answer else None,
            }
            for r, d in zip(results, done, strict=True)
        ],
    }
    return report


def _rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("cloud batch limit", r["max_running"] or "default (sized from memory)"),
        ("sessions (complete / total)", f"{r['complete_answers']} / {r['sessions']}"),
        (
            "takeovers ok (after the restart)",
            f"{r['takeovers_ok']} ({r['takeovers_ok_after_restart']})",
        ),
        (
            "takeover latency p50 / p99 (s)",
            f"{r['takeover_latency_p50_s']} / {r['takeover_latency_p99_s']}",
        ),
        ("first chunk p50 / p99 (s)", f"{r['first_chunk_p50_s']} / {r['first_chunk_p99_s']}"),
        (
            "failed takeover attempts",
            ", ".join(f"{k} {v}" for k, v in sorted(r["takeovers_failed"].items())) or "0",
        ),
        ("rejected (RESOURCE_EXHAUSTED)", r["rejected_resource_exhausted"]),
        (
            "full-text resends (sessions)",
            f"{r['full_text_resends']} ({r['sessions_with_full_text_resend']})",
        ),
        ("local fallbacks (sessions)", f"{r['local_fallbacks']} ({r['sessions_with_fallback']})"),
        ("sessions recovered", r["sessions_recovered"]),
        ("tokens cloud / edge", f"{r['cloud_tokens']} / {r['edge_tokens']}"),
        ("cloud killed after (s)", r["killed_after_s"]),
        ("cloud restart (s)", r["cloud_restart_s"]),
        ("cloud exit code after SIGTERM", r["cloud_exit_code_after_sigterm"]),
        ("wall time (s)", r["wall_s"]),
    ]


def print_table(runs: dict[str, dict[str, Any]]) -> None:
    """One column per run (before / after), side by side."""
    columns = {name: dict(_rows(r)) for name, r in runs.items()}
    keys = [k for k, _ in _rows(next(iter(runs.values())))]
    width = max(len(k) for k in keys)
    print(f"{'load and fault':<{width}}  " + "  ".join(f"{name:<28}" for name in columns))
    print(f"{'-' * width}  " + "  ".join("-" * 28 for _ in columns))
    for key in keys:
        print(f"{key:<{width}}  " + "  ".join(f"{c[key]!s:<28}" for c in columns.values()))


if __name__ == "__main__":
    sys.exit(main())
