"""The eval report's cloud-judge parts: each row paired with a chosen row (`--versus`), and
the judge's cost per judged break from the rows' stats, through the real CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from typer.testing import CliRunner

from edge.cli import app
from edge.datasets import Problem
from edge.eval_results import row_from_result
from tests.unit.test_eval_report_folders import header_config, row, write_results

JUDGE = {"trigger": "cloud-judge", "judge_threshold": "-1.0"}


def folder(tmp_path: Path) -> Path:
    rows = []
    for p in ("1", "2", "3", "4"):
        rows += [row(p, "edge", False), row(p, "cloud", True), row(p, "probe-0.27", p == "1")]
        judged = row(p, "judge-1.0", p != "4")
        rows.append(
            dataclasses.replace(
                judged, judge_calls=4, judge_accepts=3, judge_wait_s=2.0, judge_prefill_s=1.6
            )
        )
    config = header_config("s", ["edge", "cloud", "probe-0.27", "judge-1.0"])
    config["variants"]["judge-1.0"] = JUDGE
    return write_results(tmp_path / "f", config, rows)


def test_versus_pairs_every_row_with_the_chosen_one_and_the_judge_cost_is_shown(tmp_path):
    out = folder(tmp_path)
    done = CliRunner().invoke(
        app, ["eval", "s", "--report", "--out", str(out), "--versus", "probe-0.27"]
    )
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    header = next(line for line in lines if "level 1 right" in line)
    assert "vs probe-0.27: +/-, p" in header
    judge_row = next(line for line in lines if line.startswith("| judge-1.0") and "/4" in line)
    # judge right on 1-3, probe-0.27 on 1 only: +2 / -0 against probe-0.27
    assert judge_row.rstrip(" |").endswith("+2 / -0, p=0.50")
    cost = [line for line in lines if line.startswith("| judge-1.0")][-1]  # the last table
    cells = [c.strip() for c in cost.strip("|").split("|")]
    assert cells == ["judge-1.0", "0", "4.0", "75.0", "0.50", "0.40"]
    beside = [line for line in lines if line.startswith("| probe-0.27")][-1]
    assert [c.strip() for c in beside.strip("|").split("|")][2:] == ["-"] * 4
    assert "judged breaks/problem" in done.output


def test_versus_a_row_that_does_not_exist_is_one_line(tmp_path):
    done = CliRunner().invoke(
        app, ["eval", "s", "--report", "--out", str(folder(tmp_path)), "--versus", "nope"]
    )
    assert done.exit_code == 2
    assert "--versus nope: no such row" in done.output


def test_versus_without_report_is_refused(tmp_path):
    done = CliRunner().invoke(app, ["eval", "s", "--versus", "edge"])
    assert done.exit_code == 2
    assert "--versus only goes with --report" in done.output


def test_a_row_keeps_the_judge_stats_of_the_answer():
    problem = Problem(id="7", problem="q", answer="4", level=2)
    stats = {
        "edge_tokens": 10,
        "cloud_tokens": 5,
        "wall_s": 3.0,
        "judge_calls": 3,
        "judge_accepts": 2,
        "judge_wait_s": 1.5,
        "judge_prefill_s": 1.2,
    }
    kept = row_from_result(problem, "judge", {"text": "\\boxed{4}", "stats": stats})
    assert (kept.judge_calls, kept.judge_accepts) == (3, 2)
    assert (kept.judge_wait_s, kept.judge_prefill_s) == (1.5, 1.2)
