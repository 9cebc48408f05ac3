"""The device check's sections per engine, and their rows: each engine built alive only
inside its sections (decode, prefill, overhead, grpc, memory) or its OOM probe, its
measurements turned into rows against the goals of issue #19."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from scripts.gpu_check_grpc import GRPC_ROUNDS, GRPC_SESSIONS, TAKEOVER_TOKENS, grpc_takeovers
from scripts.gpu_check_measure import (
    PREFILL_TOKENS,
    decode_sweep,
    host_overhead,
    judge_break,
    prefill_2k,
)
from scripts.gpu_check_memory import oom_probe, peak_memory, plan_of, release
from scripts.gpu_check_model import Shape
from scripts.gpu_check_report import Check, Row, gib

# goals (issue #19)
ROOFLINE_GOAL, ROOFLINE_WANTED = 0.7, 0.85
GAIN_32_GOAL = 20.0
TAKEOVER_P50_GOAL_S = 0.5


@dataclass
class Setup:
    """What every engine's sections share."""

    check: Check
    shape: Shape
    model: Any
    tokenizer: Any
    device: Any
    weight_bytes: int
    roofline_ms: float | None
    prefill_rates: dict[str, float] = field(default_factory=dict)


def make_engine(setup: Setup, name: str, context_length: int) -> Any:
    from cloud.engine import ENGINES

    release(setup.device)  # mem_get_info, which sizes the plan, counts the allocator's cache
    return ENGINES[name](
        setup.model,
        setup.tokenizer,
        model_id=f"random-qwen2.5-{setup.shape.name}",
        device=setup.device,
        loaded_from=f"random init ({setup.shape.name}, scripts/gpu_check.py)",
        max_cache_bytes=None,
        context_length=context_length,
        max_running=None,
    )


def after_engine(setup: Setup, name: str, where: str) -> None:
    """With the engine gone, device memory should be back to the weights."""
    release(setup.device)
    if setup.device.type != "cuda":
        return
    import torch

    left = int(torch.cuda.memory_allocated(setup.device)) - setup.weight_bytes
    setup.check.results.setdefault("left_after_engine", {})[f"{where}[{name}]"] = left
    if left > (1 << 30):
        setup.check.note(f"[{name}] {gib(left)} still allocated beyond the weights after {where}")


def engine_sections(setup: Setup, name: str, context_length: int) -> None:
    """decode, prefill, overhead, grpc and memory for one engine (alive only in here)."""
    check, shape = setup.check, setup.shape
    engine = make_engine(setup, name, context_length)
    tag = f"{name}-{os.getpid()}"
    plan = plan_of(engine, setup.weight_bytes)
    check.results[f"plan[{name}]"] = plan
    check.note(f"[{name}] {plan['describe']}")
    release(setup.device)

    def decode() -> dict[str, Any]:
        r = decode_sweep(check, engine, shape, tag)
        done = {int(k): v for k, v in r["batches"].items() if "tok_s" in v}
        for b, v in sorted(done.items()):
            if b == 1 and setup.roofline_ms:
                ratio = setup.roofline_ms / (v["step_s_median"] * 1000)
                r["roofline_ratio"] = ratio
                check.row(
                    f"decode[{name}]",
                    "batch 1: tok/s, ms/token, share of the roofline",
                    f"{v['tok_s']:.1f} tok/s, {v['step_s_median'] * 1000:.2f} ms = "
                    f"{ratio:.2f} of roofline",
                    f">= {ROOFLINE_GOAL} ({ROOFLINE_WANTED} wanted)",
                    ratio >= ROOFLINE_GOAL,
                )
            else:  # a step still reads every weight once: the roofline step is the same
                share = ""
                if setup.roofline_ms:
                    v["roofline_ratio"] = setup.roofline_ms / (v["step_s_median"] * 1000)
                    share = f" = {v['roofline_ratio']:.2f} of roofline"
                check.row(
                    f"decode[{name}]",
                    f"batch {b}: aggregate decode tok/s (step median)",
                    f"{v['tok_s']:.1f} tok/s, {v['step_s_median'] * 1000:.2f} ms/step{share}",
                )
        for b, v in r["batches"].items():
            if "skipped" in v:
                check.add(Row(f"decode[{name}]", f"batch {b}", v["skipped"], "", "SKIPPED"))
        if 1 in done and 32 in done:
            gain = done[32]["tok_s"] / done[1]["tok_s"]
            r["gain_32"] = gain
            check.row(
                f"decode[{name}]",
                "32 sessions: aggregate decode tok/s / one session",
                f"{gain:.1f}x ({done[32]['tok_s']:.1f} vs {done[1]['tok_s']:.1f} tok/s)",
                f">= {GAIN_32_GOAL:.0f}x",
                gain >= GAIN_32_GOAL,
            )
        return r

    def prefill() -> dict[str, Any]:
        r = prefill_2k(engine, tag)
        setup.prefill_rates[name] = r["tok_s"]
        check.row(
            f"prefill[{name}]",
            f"prefill tok/s, one {PREFILL_TOKENS // 1024}k-token prompt",
            f"{r['tok_s']:.0f} tok/s ({r['tokens']} tokens, chunks of {r['chunk']})",
        )
        return r

    def judge() -> dict[str, Any]:
        r = judge_break(engine, tag)
        check.row(
            f"judge[{name}]",
            f"cloud judge at a break: prefill of {r['delta']} new tokens alone vs with a "
            f"{r['probe']}-token probe scored ({r['context']} tokens held)",
            f"{r['plain_s'] * 1000:.1f} vs {r['judged_s'] * 1000:.1f} ms: the probe costs "
            f"{r['probe_cost_s'] * 1000:.1f} ms ({r['probe_tokens_scored']} tokens scored)",
        )
        return r

    def overhead() -> dict[str, Any]:
        r: dict[str, Any] = {}
        for b in (1, 32):
            if b > engine.memory.max_running:
                continue
            h = host_overhead(engine, shape, b, f"{tag}-ovh{b}")
            r[str(b)] = h
            if h["gpu_busy_s"] is None:
                why = h.get("note") or f"n/a on {engine.device.type}"
                value = f"wall {h['wall_s'] * 1000:.2f} ms/step; GPU busy: {why}"
            else:
                value = (
                    f"wall {h['wall_s'] * 1000:.2f} ms, GPU busy {h['gpu_busy_s'] * 1000:.2f} "
                    f"ms: host {h['overhead']:.0%} of the step"
                )
            check.row(f"overhead[{name}]", f"decode step at batch {b}: wall vs GPU busy", value)
        return r

    def rpc() -> dict[str, Any]:
        r = grpc_takeovers(engine, tag)
        for n in GRPC_SESSIONS:
            s = r[str(n)]
            value = (
                f"p50 {s['p50_s']:.3f} / p99 {s['p99_s']:.3f} s (round 1 "
                f"{s['prefilled_round_p50_s']:.3f}, 2-3 {s['cached_rounds_p50_s']:.3f}); "
                f"rounds 2-3 {s['later_rounds_cached_tokens']} cached / "
                f"{s['later_rounds_prefilled_tokens']} prefilled tok"
            )
            if s["errors"]:
                value += f"; {len(s['errors'])} ERRORS"
            goal = n == 16
            check.row(
                f"grpc[{name}]",
                f"{n} session{'s' if n > 1 else ''} x {GRPC_ROUNDS} rounds of "
                f"{TAKEOVER_TOKENS}-token takeovers",
                value,
                f"p50 <= {TAKEOVER_P50_GOAL_S} s" if goal else "",
                (s["p50_s"] <= TAKEOVER_P50_GOAL_S and not s["errors"]) if goal else None,
            )
        return r

    def memory() -> dict[str, Any]:
        peak = peak_memory(setup.device)
        r = {"plan": plan, "peak": peak}
        if setup.device.type != "cuda":
            value = f"n/a on {setup.device.type} (max RSS {gib(peak['max_rss_bytes'])})"
            check.add(
                Row(
                    f"memory[{name}]",
                    "peak GPU memory vs the plan",
                    value,
                    "within the plan",
                    "n/a",
                )
            )
            return r
        within = peak["max_allocated"] <= plan["planned_bytes"]
        r["within"] = within
        check.row(
            f"memory[{name}]",
            "peak GPU memory (decode, prefill, overhead, gRPC) vs the plan",
            f"{gib(peak['max_allocated'])} allocated ({gib(peak['max_reserved'])} reserved) "
            f"of {gib(plan['planned_bytes'])} planned",
            "within the plan",
            within,
        )
        return r

    check.section(f"decode[{name}]", shape.needs_s["decode"], decode)
    check.section(f"prefill[{name}]", shape.needs_s["prefill"], prefill)
    check.section(f"judge[{name}]", shape.needs_s["judge"], judge)
    check.section(f"overhead[{name}]", shape.needs_s["overhead"], overhead)
    check.section(f"grpc[{name}]", shape.needs_s["grpc"], rpc)
    check.section(f"memory[{name}]", 0, memory)


def probe_section(setup: Setup, name: str, context_length: int, share_s: float) -> None:
    """The OOM probe for one engine, built for the probe's context (alive only in here)."""
    check = setup.check

    def probe() -> dict[str, Any]:
        engine = make_engine(setup, name, context_length)
        plan = plan_of(engine, setup.weight_bytes)
        check.note(f"[{name}] probe plan: {plan['describe']}")
        r = oom_probe(engine, setup.shape, share_s, setup.prefill_rates.get(name))
        r["plan"] = plan
        del engine
        if setup.device.type == "cuda":
            peak = r["memory"]["max_allocated"]
            mem = f"peak {gib(peak)} of {gib(plan['planned_bytes'])} planned"
            r["within_plan"] = peak <= plan["planned_bytes"]
        else:
            mem = f"no GPU: max RSS {gib(r['memory']['max_rss_bytes'])}"
        if r["oom"]:
            what = f"OOM in {r['phase']}"
        elif "stopped" in r:
            what = f"no OOM, but stopped by {r['stopped']}"
        else:
            what = "no OOM"
        check.row(
            f"oom[{name}]",
            f"{r['sessions']} sessions x {r['prompt_tokens_each']:,} tokens, context "
            f"{r['context_length']:,} ({r['kv_fraction_of_budget']:.0%} of the KV budget; "
            f"by {r['limited_by']})",
            f"{what}; {mem}",
            "no OOM at the plan's limits",
            not r["oom"],
        )
        return r

    check.section(f"oom[{name}]", setup.shape.needs_s["oom"], probe)
