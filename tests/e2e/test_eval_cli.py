"""`specthink-edge eval` end to end: a real cloud on 127.0.0.1, real models, the paper's
prompt on MATH-500; the table, the JSON report and a PNG that opens; a rerun resumes, the
results name the model pair and keep each answer's text, and a rerun against another
cloud is refused unless mixing is allowed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge import datasets

pytestmark = pytest.mark.real_models
BIN = Path(sys.executable).parent
PROGRESS = {f"{i}/6" for i in range(1, 7)}
MATH500 = datasets.resolve("math500")


def run_eval(out: Path, model: Path, cloud: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "specthink-edge"),
            "eval",
            str(MATH500),
            "--levels",
            "1",
            "--limit",
            "2",
            "--strategy",
            "speculative,edge,cloud",
            "--max-tokens",
            "24",
            "--mode",
            "non-reasoning",
            "--seed",
            "1",
            "--model",
            str(model),
            "--cloud",
            cloud,
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if not k.startswith("SPECTHINK_")},
    )


def test_eval_limit_2_writes_table_json_and_png_and_resumes(tmp_path, smollm2, smollm2_cloud):
    out = tmp_path / "eval"
    done = run_eval(out, smollm2, smollm2_cloud.address)
    assert done.returncode == 0, done.stderr
    for strategy in ("speculative", "edge", "cloud"):
        assert f"| {strategy}" in done.stdout
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    answered = [r for r in rows if r.get("kind") == "row"]
    assert len(answered) == 6  # 2 problems x 3 strategies
    assert {r["strategy"] for r in answered} == {"speculative", "edge", "cloud"}
    # a stretch may run up to 4 tokens past its budget to finish a character or word
    assert all(r["output_tokens"] <= 24 + 4 and r["wall_s"] > 0 for r in answered)
    assert all(r["cloud_tokens"] == 0 for r in answered if r["strategy"] == "edge")
    assert all(r["edge_tokens"] == 0 for r in answered if r["strategy"] == "cloud")
    assert report, "the JSON report is written"
    progress = [line for line in done.stderr.splitlines() if line.split("  ")[0] in PROGRESS]
    assert len(progress) == 6, done.stderr  # stderr is a pipe: one plain line per row

    png = out / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100

    again = run_eval(out, smollm2, smollm2_cloud.address)  # everything done: resumes to the end
    assert again.returncode == 0, again.stderr
    rows_after = (out / "results.jsonl").read_text().splitlines()
    assert len(rows_after) == len(rows)

    # the pair that answered is in the header and in every row; each row keeps its text
    header = rows[0]
    assert header["kind"] == "header"
    edge_sha = hashlib.sha256(smollm2.read_bytes()).hexdigest()
    assert header["config"]["edge_model_sha256"] == edge_sha
    assert header["config"]["cloud_model"], "the cloud said which model it serves"
    assert all(r["cloud_model"] == header["config"]["cloud_model"] for r in answered)
    assert all(r["text"] and r["edge_model_sha256"] == edge_sha for r in answered)


def test_eval_resumed_against_another_cloud_is_refused_unless_mixing_is_allowed(
    tmp_path, smollm2, smollm2_cloud
):
    from tests.integration.cloud_harness import ScriptedEngine, running_server

    out = tmp_path / "eval"
    first = run_eval(out, smollm2, smollm2_cloud.address, "--limit", "1", "--strategy", "cloud")
    assert first.returncode == 0, first.stderr
    engine = ScriptedEngine(tokens=("Four", "."), end_after=2)  # another model id
    with running_server(engine) as other:
        refused = run_eval(out, smollm2, other.address, "--limit", "1", "--strategy", "cloud")
        allowed = run_eval(
            out, smollm2, other.address, "--limit", "1", "--strategy", "cloud", "--allow-mixed"
        )
    assert refused.returncode == 2
    assert "another model pair" in refused.stderr and "--allow-mixed" in refused.stderr
    assert allowed.returncode == 0, allowed.stderr  # nothing left to answer: resumes
