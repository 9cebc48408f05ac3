"""The device check's measurements of the device and of one engine's steps, driven directly
(no server): copy bandwidth, the decode sweep over batch sizes, a 2k-token prefill, and the
host's share of a decode step. Each returns its figures; the rows are written by the caller."""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

from scripts.gpu_check_model import Shape, sync
from scripts.gpu_check_report import Check

BATCHES = (1, 8, 32, 64)
PREFILL_TOKENS = 2048
WORDS_TEXT = (
    "the keeper climbed stairs every evening counting steps lamp light sea wind rose night "
    "windows morning calm grey flat slate boat nets torn crew harbour rocks tide storm cliff "
    "gulls rope iron salt fog bell ship island shore wave north river stone field house door "
    "table bread water fire road hill tree winter summer letter number seven eleven because "
    "although perhaps quickly slowly carefully measured written remembered forgotten"
)


def bandwidth(device: Any) -> dict[str, Any]:
    """Device-to-device copy of a buffer much larger than the cache: bytes read + written
    per second, median of timed copies (CUDA events on a GPU, the wall clock on a CPU)."""
    import torch

    cuda = device.type == "cuda"
    nbytes = (2 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    times: list[float] = []
    for i in range(13):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            t = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t
        if i >= 3:  # three warm-ups
            times.append(seconds)
    same = bool(torch.equal(dst, src))
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    seconds = statistics.median(times)
    return {
        "buffer_bytes": nbytes,
        "copies": len(times),
        "median_s": seconds,
        "bytes_per_s": 2 * nbytes / seconds,
        "copy_correct": same,
        "timer": "cuda events" if cuda else "wall clock",
    }


# ---- driving an engine's steps directly ----------------------------------------------------


def filler(tokenizer: Any, tokens: int, seed: int) -> str:
    """Text of about `tokens` tokens (random common words; cut at a token boundary)."""
    rng = random.Random(seed)
    words = WORDS_TEXT.split()
    text = " ".join(rng.choice(words) for _ in range(tokens + 8))
    ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    return str(tokenizer.decode(ids))


def greedy() -> Any:
    from shared.wire import Sampling

    return Sampling(temperature=0.0, top_p=1.0, top_k=0, seed=None)


class OutOfTime(Exception):
    """The section's share of the budget ran out in the middle of its work."""


@contextlib.contextmanager
def started_runs(
    engine: Any,
    n: int,
    prompt_tokens: int,
    max_tokens: int,
    tag: str,
    deadline: float | None = None,
    progress: dict[str, Any] | None = None,
) -> Iterator[tuple[list[Any], dict[str, Any]]]:
    """`n` generate calls on `engine`, planned, started and prefilled (timed apart from
    what follows); on exit they are finished and their sessions dropped, whatever
    happened. Past `deadline` (monotonic) the prefill stops with OutOfTime; `progress`
    is kept up to date with the tokens whose KV is computed."""
    from cloud.engine_api import GenerateRequest
    from shared.wire import Message

    progress = progress if progress is not None else {}
    messages = [Message("user", "Continue the story.")]
    runs = [
        engine.plan_generate(
            GenerateRequest(
                f"{tag}-{i}",
                tuple(messages),
                f"({i}) " + filler(engine.tokenizer, prompt_tokens, seed=i),
                max_tokens,
                greedy(),
            ),
            lambda: False,
        )
        for i in range(n)
    ]
    info: dict[str, Any] = {"prompt_tokens": [len(r.prompt) for r in runs]}
    try:
        for run in runs:
            engine.start(run)
        sync(engine.device)
        started = time.perf_counter()
        steps = 0
        while filling := [r for r in runs if r.prefilling]:
            if deadline is not None and time.monotonic() > deadline:
                raise OutOfTime(f"prefill stopped after {steps} steps")
            engine.prefill_step(filling, sharing=False)
            steps += 1
            progress["kv_tokens"] = sum(len(r.s.ids) for r in runs if r.s is not None)
        sync(engine.device)
        info["prefill_s"] = time.perf_counter() - started
        info["prefill_steps"] = steps
        yield runs, info
    finally:
        try:
            engine.finish(runs)
        finally:
            for i in range(n):
                engine.drop(f"{tag}-{i}")


def decode_steps(engine: Any, runs: Sequence[Any], steps: int) -> list[float]:
    """Wall seconds of each of `steps` decode steps over the runs still going."""
    times: list[float] = []
    for _ in range(steps):
        going = [r for r in runs if not r.done]
        if not going:
            break
        sync(engine.device)
        t = time.perf_counter()
        engine.decode_step(going)
        sync(engine.device)
        times.append(time.perf_counter() - t)
    return times


def decode_sweep(check: Check, engine: Any, shape: Shape, tag: str) -> dict[str, Any]:
    """Decode tok/s at each batch size: the sessions prefilled first (timed apart), three
    warm-up steps, then `decode_steps` timed steps; tok/s = batch / median step."""
    warm = 3
    limit = engine.memory.max_running
    out: dict[str, Any] = {
        "batches": {},
        "prompt_tokens": shape.decode_prompt,
        "warm_steps": warm,
        "batch_limit": limit,
    }
    for b in BATCHES:
        if b > limit:  # the paged engine has no room for more; the loop would never admit more
            out["batches"][str(b)] = {"skipped": f"beyond the plan's batch limit {limit}"}
            continue
        if check.left < shape.needs_s["decode"] / 2:
            out["batches"][str(b)] = {"skipped": "the time budget"}
            continue
        max_tokens = warm + shape.decode_steps + 8
        with started_runs(engine, b, shape.decode_prompt, max_tokens, f"{tag}-dec{b}") as (
            runs,
            info,
        ):
            decode_steps(engine, runs, warm)
            times = decode_steps(engine, runs, shape.decode_steps)
            going = sum(not r.done for r in runs)
        step = statistics.median(times)
        out["batches"][str(b)] = {
            "batch": b,
            "step_s_median": step,
            "step_s_min": min(times),
            "step_s_max": max(times),
            "steps": len(times),
            "tok_s": b / step,
            "still_going": going,
            "prefill_s": info["prefill_s"],
            "prefill_steps": info["prefill_steps"],
        }
    return out


def prefill_2k(engine: Any, tag: str) -> dict[str, Any]:
    """One PREFILL_TOKENS prompt, the engine's own chunking (its prefill steps, as the engine
    loop runs them), twice on fresh sessions; the faster counts (the first may still pay
    for lazy init)."""
    from cloud.engine_api import GenerateRequest
    from shared.wire import Message

    messages = [Message("user", "Continue the story.")]
    tries = []
    for i in range(2):
        text = filler(engine.tokenizer, PREFILL_TOKENS - 20, seed=1000 + i)
        session = f"{tag}-pre{i}"
        sync(engine.device)
        t = time.perf_counter()
        run = engine.plan_prefill(GenerateRequest(session, tuple(messages), text), lambda: False)
        engine.start(run)
        try:
            while run.prefilling:
                engine.prefill_step([run], sharing=False)
        finally:
            engine.finish([run])
        done = run.outcome()
        sync(engine.device)
        wall = time.perf_counter() - t
        engine.drop(session)
        tokens = int(done.usage.prefilled_tokens)
        tries.append({"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall})
    best = max(tries, key=lambda x: x["tok_s"])
    return {
        "tries": tries,
        "tok_s": best["tok_s"],
        "tokens": best["tokens"],
        "chunk": getattr(engine, "prefill_chunk", None),
    }


# the cloud judge's work at a break: the edge text since the last call, then its probe
JUDGE_CONTEXT, JUDGE_DELTA, JUDGE_PROBE = 1500, 80, 20


def judge_break(
    engine: Any,
    tag: str,
    context: int = JUDGE_CONTEXT,
    delta_tokens: int = JUDGE_DELTA,
    probe_tokens: int = JUDGE_PROBE,
) -> dict[str, Any]:
    """The cloud judge's cost at one break, side by side on two sessions holding the same
    `context` tokens: a plain prefill of `delta_tokens` new tokens (what any later takeover
    computes anyway) against a judged prefill of the delta and a `probe_tokens`-token probe
    (scored: logits at every probe position). The difference is the probe's cost;
    three tries each, the fastest counts."""
    from cloud.engine_api import GenerateRequest
    from shared.wire import Message

    messages = (Message("user", "Continue the story."),)
    text = filler(engine.tokenizer, context, seed=2000)
    delta = filler(engine.tokenizer, delta_tokens, seed=2001)
    probe = filler(engine.tokenizer, probe_tokens, seed=2002)

    def timed(session: str, request: GenerateRequest) -> tuple[float, Any]:
        sync(engine.device)
        t = time.perf_counter()
        run = engine.plan_prefill(request, lambda: False)
        engine.start(run)
        try:
            while run.prefilling:
                engine.prefill_step([run], sharing=False)
        finally:
            engine.finish([run])
        sync(engine.device)
        return time.perf_counter() - t, run.outcome()

    plain, judged, scored = [], [], 0
    for i in range(3):
        for kind in ("plain", "judged"):
            session = f"{tag}-judge-{kind}{i}"
            timed(session, GenerateRequest(session, messages, text))  # the warm context
            ask = GenerateRequest(session, messages, text + delta)
            if kind == "judged":
                ask = GenerateRequest(session, messages, text + delta, probe=probe)
            wall, done = timed(session, ask)
            (judged if kind == "judged" else plain).append(wall)
            scored = max(scored, len(getattr(done, "probe_logprobs", ())))
            engine.drop(session)
    return {
        "context": context,
        "delta": delta_tokens,
        "probe": probe_tokens,
        "probe_tokens_scored": scored,
        "plain_s": min(plain),
        "judged_s": min(judged),
        "probe_cost_s": min(judged) - min(plain),
        "tries": {"plain_s": plain, "judged_s": judged},
    }


def busy_union(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels may overlap on streams)."""
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def host_overhead(engine: Any, shape: Shape, batch: int, tag: str) -> dict[str, Any]:
    """Wall time of decode steps vs the GPU's busy time in them: the union of the kernels'
    intervals as torch.profiler records them. Wall time is taken without the profiler (it
    slows the host); on a CPU there is no device time to compare, only the wall."""
    import torch

    steps = 5
    with started_runs(engine, batch, shape.decode_prompt, 3 + 2 * steps + 8, tag) as (runs, _):
        decode_steps(engine, runs, 3)
        wall = statistics.median(decode_steps(engine, runs, steps))
        if engine.device.type != "cuda":
            return {"batch": batch, "wall_s": wall, "gpu_busy_s": None, "overhead": None}
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            profiled = decode_steps(engine, runs, steps)
            torch.cuda.synchronize(engine.device)
        kernels = [
            (float(e.time_range.start), float(e.time_range.end))
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ]
    out: dict[str, Any] = {
        "batch": batch,
        "wall_s": wall,
        "profiled_wall_s": statistics.median(profiled) if profiled else None,
        "kernels_per_step": len(kernels) / max(1, len(profiled)),
        "gpu_busy_s": None,
        "overhead": None,
    }
    if kernels and profiled:
        busy = busy_union(kernels) / 1e6 / len(profiled)  # microseconds -> s per step
        out["gpu_busy_s"] = busy
        out["overhead"] = 1.0 - busy / wall if wall > 0 else None
    else:
        out["note"] = "the profiler recorded no device kernels"
    return out
