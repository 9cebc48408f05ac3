"""The device check's memory figures: an engine's memory plan, the peak the device saw, the
allocator's cache given back between engines, and the OOM probe at the plan's limits."""

from __future__ import annotations

import gc
import os
import resource
import time
from typing import Any

from scripts.gpu_check_measure import OutOfTime, decode_steps, started_runs
from scripts.gpu_check_model import Shape


def plan_of(engine: Any, weight_bytes: int) -> dict[str, Any]:
    """The engine's memory plan; `planned_bytes` (weights + KV budget + reserve) where the
    plan has it, else weights + KV budget, said so."""
    plan = engine.memory
    planned = getattr(plan, "planned_bytes", None)
    basis = "plan.planned_bytes (weights + KV budget + step reserve)"
    if planned is None:
        planned = weight_bytes + plan.budget_bytes
        basis = "weights + KV budget (the plan states no total)"
    return {
        "engine": getattr(engine, "kind", type(engine).__name__),
        "describe": plan.describe(),
        "budget_bytes": plan.budget_bytes,
        "budget_tokens": plan.budget_tokens,
        "bytes_per_token": plan.bytes_per_token,
        "max_running": plan.max_running,
        "context_length": plan.context_length,
        "free_bytes": plan.free_bytes,
        "weights_bytes": getattr(plan, "weights_bytes", None),
        "reserve_bytes": getattr(plan, "reserve_bytes", None),
        "sessions": getattr(plan, "sessions", None),
        "slots": getattr(plan, "slots", None),
        "planned_bytes": int(planned),
        "planned_basis": basis,
    }


def peak_memory(device: Any) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        return {"device": device.type, "max_rss_bytes": max_rss()}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "device": "cuda",
        "max_allocated": int(torch.cuda.max_memory_allocated(device)),
        "max_reserved": int(torch.cuda.max_memory_reserved(device)),
        "allocated_now": int(torch.cuda.memory_allocated(device)),
        "free_now": int(free),
        "total": int(total),
    }


def max_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def release(device: Any) -> None:
    """Give the allocator's cache back (the plan's mem_get_info counts it as used) and start
    a new peak."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(exc: BaseException | None) -> bool:
    """torch's OutOfMemoryError or the engine's EngineOutOfMemory, here or as a cause."""
    seen = 0
    while exc is not None and seen < 8:
        if type(exc).__name__ in ("OutOfMemoryError", "EngineOutOfMemory"):
            return True
        if "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def oom_probe(
    engine: Any, shape: Shape, share_s: float, prefill_rate: float | None
) -> dict[str, Any]:
    """max_running sessions, each with as long a prompt as the KV budget and the context
    give it (or the time share allows, at the measured prefill rate), prefilled, then
    decoded together for a few steps. Any out-of-memory error, where it happened, and the
    peak memory."""
    plan = engine.memory
    sessions = plan.max_running
    new_tokens = 8
    room = 48  # the chat template around the text, and the tokens written
    per_session_plan = max(16, min(plan.budget_tokens // sessions, engine.context_length) - room)
    tokens, limited_by = per_session_plan, "the plan"
    if shape.probe_cap is not None and shape.probe_cap < tokens:
        tokens, limited_by = shape.probe_cap, f"--shape {shape.name}'s cap"
    if prefill_rate:
        # prefill at a long context is slower than the measured 2k: keep a margin
        by_time = int((share_s - 20.0) * prefill_rate * 0.6 / sessions)
        if by_time < tokens:
            tokens, limited_by = max(16, by_time), "the time budget"
    release(engine.device)
    out: dict[str, Any] = {
        "sessions": sessions,
        "context_length": engine.context_length,
        "prompt_tokens_each": tokens,
        "plan_tokens_each": per_session_plan,
        "limited_by": limited_by,
        "oom": False,
        "phase": "prefill",
    }
    progress: dict[str, Any] = {"kv_tokens": 0}
    deadline = time.monotonic() + share_s - 10.0
    tag = f"oom-{os.getpid()}"
    try:
        with started_runs(
            engine, sessions, tokens, new_tokens + 4, tag, deadline=deadline, progress=progress
        ) as (runs, info):
            out["phase"] = "decode"
            out["prefill_s"] = info["prefill_s"]
            out["decode_step_s"] = decode_steps(engine, runs, 4)
            progress["kv_tokens"] = sum(len(r.s.ids) for r in runs if r.s is not None)
            out["phase"] = "done"
    except OutOfTime as exc:
        out["stopped"] = f"the time budget: {exc}"
    except Exception as exc:
        if not is_oom(exc):
            raise
        out["oom"] = True
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    out["kv_tokens"] = progress["kv_tokens"]
    out["kv_fraction_of_budget"] = progress["kv_tokens"] / max(1, plan.budget_tokens)
    out["memory"] = peak_memory(engine.device)
    return out
