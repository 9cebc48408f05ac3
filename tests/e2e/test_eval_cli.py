"""`specthink-edge eval` end to end: a real cloud on 127.0.0.1, real models, the paper's
prompt on MATH-500; the table, the JSON report and a PNG that opens; a rerun resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_models
BIN = Path(sys.executable).parent
MATH500 = Path(__file__).resolve().parents[3] / "shared" / "data" / "math500.jsonl"


def run_eval(out: Path, model: Path, cloud: str) -> subprocess.CompletedProcess[str]:
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
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if not k.startswith("SPECTHINK_")},
    )


@pytest.mark.skipif(not MATH500.exists(), reason="the handbook's data/ is not beside the repo")
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
    assert all(r["output_tokens"] <= 24 and r["wall_s"] > 0 for r in answered)
    assert all(r["cloud_tokens"] == 0 for r in answered if r["strategy"] == "edge")
    assert all(r["edge_tokens"] == 0 for r in answered if r["strategy"] == "cloud")
    assert report, "the JSON report is written"

    png = out / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100

    again = run_eval(out, smollm2, smollm2_cloud.address)  # everything done: resumes to the end
    assert again.returncode == 0, again.stderr
    rows_after = (out / "results.jsonl").read_text().splitlines()
    assert len(rows_after) == len(rows)
