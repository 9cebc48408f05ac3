"""The benchmark's sections over the wire: `e2e` (speculative, edge-only and cloud-only
on the demo pair, interleaved, against the ideal speed-up 1/(s+(1-s)/r)) and `network` (the
same speculative session behind `scripts.delay_proxy` at added round-trip times). Both also
count the prefill work of their takeovers. Run through `scripts.bench`, which owns the rig."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from scripts.bench_rig import (
    Report,
    Rig,
    Row,
    median,
    prefill_ahead_option,
    prefill_work,
    run_session,
)

ROOT = Path(__file__).resolve().parents[1]

E2E_PROMPTS = (
    "A shop sells pencils at 3 for 25 cents. How much do 18 pencils cost? Explain step by step.",
    "Explain why the sky is blue, in a few short paragraphs.",
    "What is 17 * 24? Show your working, then check the result another way.",
    "Explain what a prime number is and list the primes below 30.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Explain.",
)
# Many paragraphs -> many breaks -> many takeovers (network and prefill-work sections).
LONG_PROMPT = "Give ten tips for learning to program. Write each tip as its own short paragraph."


def takeover_prefill(runs: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    """What the takeovers of runs called `name` still prefilled (tokens, engine seconds)."""
    calls = [c for r in runs if r["name"] == name for c in r["calls"]]
    return {
        "prefilled": sum(c["prefilled"] for c in calls),
        "prefill_s": sum(c["prefill_s"] for c in calls),
        "calls": len(calls),
    }


def bench_e2e(rig: Rig, rep: Report, quick: bool) -> None:
    """speculative / edge / cloud on the demo pair, several prompts, interleaved."""
    prompts = E2E_PROMPTS[:1] if quick else E2E_PROMPTS[:3]
    max_tokens = 140 if quick else 200
    ahead = prefill_ahead_option()
    runs: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        order = ["speculative", "edge", "cloud"] + (["speculative+prefill"] if ahead else [])
        if i % 2:
            order.reverse()  # alternate the order so no strategy always runs first
        for name in order:
            extra = {ahead[0]: ahead[1]} if ahead and name == "speculative+prefill" else None
            r = run_session(rig, name.split("+")[0], prompt, max_tokens, extra=extra)
            r["name"], r["prompt"] = name, i
            runs.append(r)
            rig.log(
                f"  e2e prompt {i} {name}: {r['tokens']} tok in {r['wall_s']:.1f} s, "
                f"cloud {r['cloud_tokens']}, takeovers {r['takeovers']}"
            )

    def pooled(name: str) -> dict[str, float]:
        rs = [r for r in runs if r["name"] == name]
        tokens, wall = sum(r["tokens"] for r in rs), sum(r["wall_s"] for r in rs)
        cloud = sum(r["cloud_tokens"] for r in rs)
        return {
            "tokens": tokens,
            "wall_s": wall,
            "tok_s": tokens / wall,
            "cloud_share": cloud / tokens if tokens else 0.0,
            "takeovers": sum(r["takeovers"] for r in rs),
        }

    spec, edge, cloud = pooled("speculative"), pooled("edge"), pooled("cloud")
    r_ = edge["tok_s"] / cloud["tok_s"]
    s = spec["cloud_share"]
    ideal = 1 / (s + (1 - s) / r_)
    speedup = spec["tok_s"] / cloud["tok_s"]
    wall_speedup = cloud["wall_s"] / spec["wall_s"]
    out: dict[str, Any] = {
        "prompts": list(prompts),
        "max_tokens": max_tokens,
        "runs": runs,
        "pooled": {"speculative": spec, "edge": edge, "cloud": cloud},
        "r_edge_over_cloud": r_,
        "s_cloud_share": s,
        "ideal_speedup": ideal,
        "measured_speedup_tok_s": speedup,
        "measured_speedup_wall": wall_speedup,
        "fraction_of_ideal": speedup / ideal,
        "prefill_work": prefill_work([x for x in runs if x["name"] == "speculative"]),
    }
    for name, p in (("speculative", spec), ("edge", edge), ("cloud", cloud)):
        rep.row(
            "e2e",
            f"{name}: wall, tok/s, cloud share, takeovers ({len(prompts)} prompts)",
            f"{p['wall_s']:.1f} s, {p['tok_s']:.2f} tok/s, s={p['cloud_share']:.2f}, {p['takeovers']}",
        )
    rep.row("e2e", "r = edge tok/s / cloud tok/s", f"{r_:.1f}")
    rep.row(
        "e2e",
        "speed-up over cloud-only (tok/s ratio) vs ideal 1/(s+(1-s)/r)",
        f"{speedup:.2f}x vs {ideal:.2f}x  (wall ratio {wall_speedup:.2f}x)",
    )
    rep.row(
        "e2e",
        "measured / ideal speed-up",
        f"{speedup / ideal:.0%}",
        ">= 90%",
        speedup / ideal >= 0.90,
    )
    if ahead:
        with_ = pooled("speculative+prefill")
        pays = [
            a["wall_s"] / b["wall_s"]
            for a in runs
            if a["name"] == "speculative+prefill"
            for b in runs
            if b["name"] == "speculative" and b["prompt"] == a["prompt"]
        ]
        out["prefill_ahead"] = {
            "option": f"{ahead[0]}={ahead[1]}",
            "pooled_with": with_,
            "wall_ratio_per_prompt": pays,
            "wall_ratio_median": median(pays),
            "prefill_calls": sum(
                len(x["prefills"]) for x in runs if x["name"] == "speculative+prefill"
            ),
            "takeovers_with": takeover_prefill(runs, "speculative+prefill"),
            "takeovers_without": takeover_prefill(runs, "speculative"),
        }
        rep.row(
            "e2e",
            f"prefill ahead ({ahead[0]}={ahead[1]}): wall with / without (median per prompt)",
            f"{median(pays):.3f}  ({out['prefill_ahead']['prefill_calls']} Prefill calls; < 1 pays)",
        )
        w, wo = out["prefill_ahead"]["takeovers_with"], out["prefill_ahead"]["takeovers_without"]
        rep.row(
            "e2e",
            "  prefill ahead: tokens / s still prefilled inside takeovers, with vs without",
            f"{w['prefilled']} tok, {w['prefill_s']:.2f} s vs {wo['prefilled']} tok, "
            f"{wo['prefill_s']:.2f} s",
        )
    else:
        out["prefill_ahead"] = None
        rep.rows.append(
            Row("e2e", "prefill ahead (SessionOptions has no prefill_ahead)", "-", "", "SKIPPED")
        )
    rep.results["e2e"] = out
    pw = out["prefill_work"]
    rep.row(
        "prefill",
        f"prefilled / new tokens, e2e speculative runs ({pw['calls']} takeovers)",
        f"{pw['ratio']:.3f}  (+{pw['extra_per_call']:.1f} tok per call)",
        "<= 1.1",
        pw["ratio"] <= 1.1,
    )


@contextlib.contextmanager
def delay_proxy(address: str, rtt_ms: float) -> Iterator[str]:
    """scripts.delay_proxy in a subprocess (its own GIL and event loop)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.delay_proxy", "--target", address, "--rtt-ms", str(rtt_ms)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"delay proxy did not start: {line!r}")
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_network(rig: Rig, rep: Report, quick: bool) -> None:
    """The same speculative session at +0/20/50/100 ms RTT: added time vs takeovers x RTT.

    Also the long session for the prefill-work figure: many breaks, short takeovers."""
    delays = (0, 50) if quick else (0, 20, 50, 100)
    max_tokens = 120 if quick else 300
    knobs = {"start_tokens": 20, "takeover_tokens": 8}
    out: dict[str, Any] = {
        "delays_ms": list(delays),
        "max_tokens": max_tokens,
        "policy": knobs,
        "prompt": LONG_PROMPT,
        "runs": {},
    }
    for rtt in delays:
        with delay_proxy(rig.address, rtt) as address:
            client = rig.connect(address)
            started = time.perf_counter()
            client._connect()  # channel connect: TCP + HTTP/2 handshake, a few RTTs, once
            connect_s = time.perf_counter() - started
            try:
                r = run_session(
                    rig,
                    "speculative",
                    LONG_PROMPT,
                    max_tokens,
                    client=client,
                    policy_overrides=knobs,
                )
            finally:
                client.close()
        calls = r["calls"]
        # time per takeover that is not the cloud's compute: network + gRPC + servicer
        r["noncompute_s"] = sum(
            c["wall_s"] - c["queue_s"] - c["prefill_s"] - c["decode_s"] for c in calls
        )
        r["connect_s"] = connect_s
        out["runs"][str(rtt)] = r
        rig.log(
            f"  network +{rtt} ms: {r['tokens']} tok in {r['wall_s']:.1f} s, "
            f"{r['takeovers']} takeovers, non-compute {r['noncompute_s']:.3f} s, "
            f"connect {connect_s * 1000:.0f} ms"
        )
    base = out["runs"]["0"]
    for rtt in delays[1:]:
        r = out["runs"][str(rtt)]
        expected = r["takeovers"] * rtt / 1000
        added = r["noncompute_s"] - base["noncompute_s"]
        added_wall = r["wall_s"] - base["wall_s"]
        r["expected_added_s"], r["added_noncompute_s"], r["added_wall_s"] = (
            expected,
            added,
            added_wall,
        )
        r["round_trips_per_takeover"] = added / expected if expected else None
        r["added_connect_ms"] = (r["connect_s"] - base["connect_s"]) * 1000
        same = r["takeovers"] == base["takeovers"] and r["tokens"] == base["tokens"]
        rts = r["round_trips_per_takeover"]
        rep.row(
            "network",
            f"+{rtt} ms RTT: added time / (takeovers x RTT), {r['takeovers']} takeovers"
            + ("" if same else " (run differs from +0!)"),
            f"{rts:.2f} RTT/takeover  (+{added:.2f} s vs {expected:.2f} s; wall {added_wall:+.1f} s; "
            f"connect +{r['added_connect_ms']:.0f} ms once)",
            "0.8 - 1.2",
            0.8 <= rts <= 1.2,
        )
    rep.results["network"] = out
    pw = prefill_work(list(out["runs"].values()))
    out["prefill_work"] = pw
    rep.row(
        "prefill",
        f"prefilled / new tokens, long sessions ({pw['calls']} takeovers)",
        f"{pw['ratio']:.3f}  (+{pw['extra_per_call']:.1f} tok per call)",
        "<= 1.1",
        pw["ratio"] <= 1.1,
    )
