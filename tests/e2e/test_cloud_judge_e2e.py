"""`ask --set trigger=cloud-judge --json` on real models over a real socket: llama.cpp's
SmolLM2 drafts, `specthink-cloud serve` (transformers SmolLM2) judges each probe in the
takeover call. A threshold every probe passes keeps them all (rule `cloud_accepts` with
the score, no cloud text); one no probe reaches hands every judged break to the cloud
(rule `cloud_judge` with the score); one call per judged break either way."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_speculative_e2e import PROMPT, ask

pytestmark = pytest.mark.real_models


def _judged(smollm2, cloud, threshold: str, tokens: str = "120") -> dict:
    done = ask(
        PROMPT,  # several paragraphs
        "--model", str(smollm2),
        "--cloud", cloud.address,
        "--set", "trigger=cloud-judge",
        "--set", f"judge_threshold={threshold}",
        "--set", "start_tokens=0",  # the edge writes the opening: every break is a probe
        "--json", "--temperature", "0", "--max-tokens", tokens,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    segments, stats = result["segments"], result["stats"]
    assert "".join(s["text"] for s in segments) == result["text"]
    for source in ("edge", "cloud"):
        written = sum(s["tokens"] for s in segments if s["source"] == source)
        assert stats[f"{source}_tokens"] == written
    assert not stats["fallback"]
    return result


def _scores(result: dict, rule: str) -> list[float]:
    return [
        float(s["reason"].split(":")[1].split("+")[0])
        for s in result["segments"]
        if s["reason"].startswith(f"{rule}:")
    ]


def test_a_threshold_every_probe_passes_keeps_them_all(smollm2, smollm2_cloud):
    result = _judged(smollm2, smollm2_cloud, "-1000")
    kept = _scores(result, "cloud_accepts")
    stats = result["stats"]
    assert kept, result["segments"]
    assert all(-1000 <= score <= 0 for score in kept)
    assert stats["cloud_tokens"] == 0 and stats["takeovers"] == 0
    assert stats["judge_calls"] == stats["judge_accepts"] == len(kept)
    assert stats["cloud_calls"] == len(kept)  # one round trip per judged break
    assert stats["judge_wait_s"] > 0 and stats["judge_prefill_s"] > 0


def test_a_threshold_no_probe_reaches_hands_every_judged_break_over(smollm2, smollm2_cloud):
    result = _judged(smollm2, smollm2_cloud, "0")
    rejected = _scores(result, "cloud_judge")
    stats = result["stats"]
    assert rejected, result["segments"]
    assert all(score < 0 for score in rejected)
    assert stats["judge_accepts"] == 0 and stats["judge_calls"] == len(rejected)
    assert stats["takeovers"] == len(rejected) and stats["cloud_tokens"] > 0
    assert stats["probe_tokens_discarded"] > 0
