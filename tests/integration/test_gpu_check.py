"""The prepared device check runs here on CPU with `--shape tiny`, so it cannot rot before
a GPU is lent: every section runs through the real engines and a real gRPC server, every
row is printed and in the JSON, and the numbers are finite and hang together."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloud.engine import ENGINES

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"
SECTIONS = ("decode", "prefill", "judge", "overhead", "grpc", "memory", "oom")
STATUSES = {"MET", "NOT MET", "info", "n/a"}

pytestmark = pytest.mark.real_models  # the tokenizer comes from the bundled Qwen2.5 GGUF


@pytest.fixture(scope="module")
def tiny_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One `--shape tiny` run; its tokenizer is extracted once into pytest's cache folder
    (the script extracts it itself when the folder is empty)."""
    cache = getattr(request.config, "cache", None)
    base = Path(cache.mkdir("gpu-check")) if cache is not None else tmp_path_factory.mktemp("tok")
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--shape",
            "tiny",
            "--tokenizer",
            str(base / "tokenizer"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    doc_path = out / "gpu_check.json"
    assert doc_path.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return {"proc": proc, "doc": json.loads(doc_path.read_text())}


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def test_tiny_check_runs_every_section_without_error(tiny_run: dict[str, Any]) -> None:
    proc, doc = tiny_run["proc"], tiny_run["doc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert doc["complete"] is True
    assert doc["errors"] == [] and doc["skipped"] == []
    assert doc["meta"]["shape"] == "tiny" and doc["meta"]["engines"] == list(ENGINES)
    expected = {"build", "bandwidth"} | {f"{s}[{e}]" for s in SECTIONS for e in ENGINES}
    assert expected <= set(doc["sections"])
    assert all(math.isfinite(x) for x in _numbers(doc))  # NaN/inf would be null, not numbers


def test_every_row_is_printed_with_a_status_and_goals_say_met_or_not(
    tiny_run: dict[str, Any],
) -> None:
    stdout, rows = tiny_run["proc"].stdout, tiny_run["doc"]["rows"]
    for row in rows:
        assert row["status"] in STATUSES, row
        assert row["figure"] in stdout and row["value"] in stdout
    goals = {(r["section"], r["figure"].split(":")[0]): r["status"] for r in rows if r["goal"]}
    assert goals[("build", "logits of a 16-token forward")] == "MET"
    assert goals[("bandwidth", "device-to-device copy, read + written (wall clock)")] == "MET"
    for e in ENGINES:
        for section, figure in (
            (f"decode[{e}]", "batch 1"),
            (f"decode[{e}]", "32 sessions"),
            (f"grpc[{e}]", "16 sessions x 3 rounds of 20-token takeovers"),
            (f"memory[{e}]", "peak GPU memory vs the plan"),
        ):
            assert goals[(section, figure)] in {"MET", "NOT MET", "n/a"}, (section, figure)
        oom = [r for r in rows if r["section"] == f"oom[{e}]"]
        assert len(oom) == 1 and oom[0]["status"] == "MET", oom  # no OOM on a CPU


def test_numbers_are_plausible(tiny_run: dict[str, Any]) -> None:
    doc = tiny_run["doc"]
    s = doc["sections"]
    assert s["build"]["logits_finite"] and s["build"]["params"] > 1e6
    assert s["build"]["decode_step_bytes"] < s["build"]["weight_bytes"]
    assert s["bandwidth"]["copy_correct"] and s["bandwidth"]["bytes_per_s"] > 1e8
    assert s["bandwidth"]["roofline_ms_per_token"] > 0
    for e in ENGINES:
        decode = s[f"decode[{e}]"]
        for b in (1, 8, 32, 64):
            v = decode["batches"][str(b)]
            assert v["tok_s"] > 0 and v["steps"] >= 4 and v["still_going"] == b, (e, b, v)
            assert v["step_s_min"] <= v["step_s_median"] <= v["step_s_max"]
        assert decode["roofline_ratio"] > 0 and decode["gain_32"] > 0
        prefill = s[f"prefill[{e}]"]
        assert 1900 <= prefill["tokens"] <= 2100 and prefill["tok_s"] > 0
        judge = s[f"judge[{e}]"]
        assert judge["probe_tokens_scored"] >= 10  # ~20 filler tokens, in the cloud's tokenizer
        assert judge["plain_s"] > 0 and judge["judged_s"] > 0
        overhead = s[f"overhead[{e}]"]
        assert overhead["1"]["wall_s"] > 0 and overhead["1"]["gpu_busy_s"] is None  # CPU
        grpc = s[f"grpc[{e}]"]
        for n in (1, 16):
            g = grpc[str(n)]
            assert g["errors"] == [] and g["takeovers"] == 3 * n
            assert 0 < g["p50_s"] <= g["p99_s"]
            # 20 tokens each (a word cut at the budget may take up to 4 more); no EOS
            assert all(20 <= r["generated"] <= 24 for r in g["records"]), g["records"]
            # rounds 2-3 resend the whole text: most of it is found in the session cache
            assert g["later_rounds_cached_tokens"] > 2 * g["later_rounds_prefilled_tokens"]
            assert all(r["prefilled"] == r["prompt"] for r in g["records"] if r["round"] == 0)
        plan = s[f"plan[{e}]"]
        assert plan["planned_bytes"] >= plan["budget_bytes"] > 0 and plan["max_running"] >= 1
        oom = s[f"oom[{e}]"]
        assert oom["oom"] is False and oom["phase"] == "done"
        assert oom["sessions"] == s[f"oom[{e}]"]["plan"]["max_running"]
        assert oom["kv_tokens"] >= oom["sessions"] * oom["prompt_tokens_each"]
        assert len(oom["decode_step_s"]) == 4
