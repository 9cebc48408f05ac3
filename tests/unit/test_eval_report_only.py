"""`specthink-edge eval --report`: the table from a results file as it stands, over the
problems every strategy has answered, with no model and no cloud."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge.cli import app
from edge.eval_results import Row
from edge.evaluate import answered_by_all

STRATEGIES = ["edge", "cloud", "unc-1.1"]


def row(problem: str, strategy: str, correct: bool, tokens: int = 100) -> Row:
    cloud = tokens if strategy == "cloud" else (40 if strategy == "unc-1.1" else 0)
    return Row(
        problem_id=problem,
        strategy=strategy,
        level=1,
        gold="4",
        predicted="4" if correct else "5",
        correct=correct,
        output_tokens=tokens,
        edge_tokens=tokens - cloud,
        cloud_tokens=cloud,
        wall_s=10.0,
        ttft_s=0.5,
        tokens_per_s=tokens / 10.0,
        takeovers=1 if cloud else 0,
        fallback=False,
        error=None,
    )


def write_results(path: Path, rows: list[Row]) -> None:
    header = {"kind": "header", "version": 1, "config": {"strategies": STRATEGIES}}
    lines = [json.dumps(header)] + [r.to_json() for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_only_problems_answered_by_every_strategy_are_kept():
    rows = [row("a", s, True) for s in STRATEGIES] + [row("b", "edge", False)]
    kept, left_out = answered_by_all(rows, STRATEGIES)
    assert {r.problem_id for r in kept} == {"a"}
    assert len(kept) == 3 and left_out == 1


def test_a_strategy_not_asked_for_is_not_counted():
    rows = [row("a", s, True) for s in STRATEGIES]
    kept, left_out = answered_by_all(rows, ["edge", "cloud"])
    assert {r.strategy for r in kept} == {"edge", "cloud"} and left_out == 1


def test_report_counts_complete_problems_and_writes_json_and_png(tmp_path: Path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    out.mkdir()
    # problem a: all three right; b: only the cloud right; c: the edge alone so far
    rows = [row("a", s, True) for s in STRATEGIES]
    rows += [row("b", "edge", False), row("b", "cloud", True), row("b", "unc-1.1", False)]
    rows += [row("c", "edge", True)]
    write_results(out / "results.jsonl", rows)
    before = (out / "results.jsonl").read_bytes()

    result = CliRunner().invoke(app, ["eval", "math500", "--out", str(out), "--report"])

    assert result.exit_code == 0, result.output
    main_table, by_level_and_paired = result.stdout.split("\n\n", 1)
    table = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in main_table.splitlines()
        if line.startswith("| ") and "strategy" not in line
    }
    assert set(table) == set(STRATEGIES)
    assert table["cloud"][0] == "2" and table["cloud"][1].startswith("100.0")
    assert table["edge"][0] == "2" and table["edge"][1].startswith("50.0")  # c is left out
    assert "2 problems every strategy has answered" in result.stderr
    paired_rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in by_level_and_paired.splitlines()
        if line.startswith("| ") and "strategy" not in line
    }
    # on b the cloud is right where the edge is wrong; unc-1.1 matches the edge on both
    assert paired_rows["cloud"] == ["2/2", "+1 / -0, p=1.00", "-"]
    assert paired_rows["unc-1.1"] == ["1/2", "+0 / -0, p=1.00", "+0 / -1, p=1.00"]
    report = json.loads((out / "report.json").read_text())
    assert report["paired"]["edge"]["cloud"]["wins"] == 1
    assert report["accuracy_by_level"]["edge"] == {"1": {"right": 1, "n": 2}}
    assert {s["strategy"]: s["n"] for s in report["summaries"]} == dict.fromkeys(STRATEGIES, 2)
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.jsonl").read_bytes() == before  # the results are only read


def test_report_without_results_says_so(tmp_path: Path):
    result = CliRunner().invoke(app, ["eval", "math500", "--out", str(tmp_path), "--report"])
    assert result.exit_code == 2
    assert "no results in" in result.stderr and "run the eval first" in result.stderr
