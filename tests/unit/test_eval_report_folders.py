"""`specthink-edge eval --report --also DIR --strategy ...`: one table over the results of
several folders (each (problem, strategy) from one of them, the same models and settings),
and only the rows asked for, driven through the real CLI on small results files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge.cli import app
from edge.eval_results import Row

POLICY = {"trigger": "keywords", "uncertainty_threshold": 1.1, "uncertainty_window": 1}
PROBE = {"trigger": "uncertainty", "uncertainty_threshold": "0.27", "uncertainty_window": 20}


def header_config(dataset: str, strategies: list[str], **changes: Any) -> dict[str, Any]:
    """A results header's config as `eval` writes it (the settings that make rows comparable)."""
    return {
        "dataset": f"{dataset}.jsonl",
        "levels": None,
        "limit": None,
        "strategies": strategies,
        "max_tokens": 400,
        "mode": "non-reasoning",
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 50,
        "seed": 1,
        "edge_model": "models/edge.gguf",
        "policy": POLICY,
        "variants": {"probe-0.27": PROBE} if "probe-0.27" in strategies else {},
        "cloud_model": "models/cloud.gguf",
        "edge_model_sha256": "ab" * 32,
        **changes,
    }


def row(problem: str, strategy: str, correct: bool) -> Row:
    cloud = {"edge": 0, "cloud": 100}.get(strategy, 40)
    return Row(
        problem_id=problem,
        strategy=strategy,
        level=1,
        gold="4",
        predicted="4" if correct else "5",
        correct=correct,
        output_tokens=100,
        edge_tokens=100 - cloud,
        cloud_tokens=cloud,
        wall_s=10.0,
        ttft_s=0.5,
        tokens_per_s=10.0,
        takeovers=1 if cloud else 0,
        fallback=False,
        error=None,
    )


def write_results(folder: Path, config: dict[str, Any], rows: list[Row]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = {"kind": "header", "version": 1, "created": "2026-12-03T00:00:00+00:00"}
    lines = [json.dumps({**header, "config": config})] + [r.to_json() for r in rows]
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def first_and_second(tmp_path: Path) -> tuple[Path, Path]:
    """Folder a: problems 1-2 under edge, cloud, speculative, probe-0.27; folder b: problems
    3-5 under edge, cloud, probe-0.27 (5 not yet under probe-0.27)."""
    four = ["edge", "cloud", "speculative", "probe-0.27"]
    a = write_results(
        tmp_path / "a",
        header_config("s-a", four),
        [row(p, s, s != "edge") for p in ("1", "2") for s in four],
    )
    three = ["edge", "cloud", "probe-0.27"]
    b_rows = [row(p, s, s == "cloud") for p in ("3", "4") for s in three]
    b_rows += [row("5", "edge", True), row("5", "cloud", True)]
    b = write_results(
        tmp_path / "b",
        # another base policy: probe-0.27 sets every knob it differs in, so it is the same row
        header_config("s-b", three, policy={**POLICY, "uncertainty_threshold": 0.27}),
        b_rows,
    )
    return a, b


def report(*args: str) -> Any:
    return CliRunner().invoke(app, ["eval", "s-ab", "--report", *args])


def table_of(stdout: str) -> dict[str, list[str]]:
    """The main table's cells per strategy, in the order printed."""
    main_table = stdout.split("\n\n", 1)[0]
    return {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in main_table.splitlines()
        if line.startswith("| ") and "strategy" not in line
    }


@pytest.fixture(autouse=True)
def _needs_matplotlib() -> None:
    pytest.importorskip("matplotlib")


def test_chosen_rows_count_problems_from_both_folders(tmp_path: Path):
    a, b = first_and_second(tmp_path)
    out = tmp_path / "ab"  # holds no results: the rows come from --also
    before = {f: (f / "results.jsonl").read_bytes() for f in (a, b)}

    result = report(
        "--out", str(out), "--also", str(a), "--also", str(b), "--strategy", "cloud,edge,probe-0.27"
    )

    assert result.exit_code == 0, result.output
    table = table_of(result.stdout)
    assert list(table) == ["cloud", "edge", "probe-0.27"]  # the order asked for
    assert {s: cells[0] for s, cells in table.items()} == dict.fromkeys(table, "4")  # 1-4
    assert table["edge"][1].startswith("0.0") and table["cloud"][1].startswith("100.0")
    assert table["probe-0.27"][1].startswith("50.0")  # right on 1-2, wrong on 3-4
    assert "4 problems every strategy has answered" in result.stderr
    assert "2 row(s)" in result.stderr  # problem 5's edge and cloud rows
    report_json = json.loads((out / "report.json").read_text())
    assert report_json["config"]["results_folders"] == [str(a), str(b)]
    assert report_json["config"]["strategies"] == ["cloud", "edge", "probe-0.27"]
    assert report_json["config"]["dataset"] == "s-ab"
    assert report_json["config"]["variants"] == {"probe-0.27": PROBE}
    assert {r["problem_id"] for r in report_json["rows"]} == {"1", "2", "3", "4"}
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert {f: (f / "results.jsonl").read_bytes() for f in (a, b)} == before  # only read


def test_without_strategy_every_row_of_the_headers_counts(tmp_path: Path):
    """speculative is in folder a only: no problem of b is answered by every row."""
    a, b = first_and_second(tmp_path)

    result = report("--out", str(tmp_path / "ab"), "--also", str(a), "--also", str(b))

    assert result.exit_code == 0, result.output
    table = table_of(result.stdout)
    assert list(table) == ["edge", "speculative", "cloud", "probe-0.27"]
    assert {cells[0] for cells in table.values()} == {"2"}
    assert "2 problems every strategy has answered" in result.stderr


def test_strategy_subset_of_one_folder_counts_what_those_rows_answered(tmp_path: Path):
    _, b = first_and_second(tmp_path)

    all_rows = report("--out", str(b))
    two_rows = report("--out", str(b), "--strategy", "edge,cloud")

    assert all_rows.exit_code == 0 and two_rows.exit_code == 0, two_rows.output
    assert {cells[0] for cells in table_of(all_rows.stdout).values()} == {"2"}
    assert table_of(two_rows.stdout).keys() == {"edge", "cloud"}
    assert {cells[0] for cells in table_of(two_rows.stdout).values()} == {"3"}  # 5 counts
    assert "left out" not in two_rows.stderr
    assert json.loads((b / "report.json").read_text())["config"]["strategies"] == [
        "edge",
        "cloud",
    ]


def test_a_strategy_no_folder_holds_is_refused_naming_those_there(tmp_path: Path):
    a, _ = first_and_second(tmp_path)

    result = report("--out", str(a), "--strategy", "edge,judge-1")

    assert result.exit_code == 2
    assert "--strategy judge-1" in result.stderr
    assert "edge, cloud, speculative, probe-0.27" in result.stderr
    assert not (a / "report.json").exists()


def test_a_row_in_two_folders_is_refused(tmp_path: Path):
    a, _ = first_and_second(tmp_path)
    c = write_results(
        tmp_path / "c",
        header_config("s-c", ["edge"]),
        [row("9", "edge", True), row("2", "edge", True)],
    )

    result = report("--out", str(tmp_path / "ac"), "--also", str(a), "--also", str(c))

    assert result.exit_code == 2
    assert "problem '2' under 'edge'" in result.stderr
    assert str(a) in result.stderr and str(c) in result.stderr
    assert not (tmp_path / "ac" / "report.json").exists()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"max_tokens": 800}, "max_tokens (400 vs 800)"),
        ({"cloud_model": "models/other.gguf"}, "cloud_model"),
        ({"seed": 2}, "seed (1 vs 2)"),
        (
            {"variants": {"probe-0.27": {**PROBE, "uncertainty_window": 10}}},
            "the policy of 'probe-0.27' (uncertainty_window: 20 vs 10)",
        ),
    ],
)
def test_folders_with_other_settings_are_refused(tmp_path: Path, changes, named):
    a, _ = first_and_second(tmp_path)
    other = write_results(
        tmp_path / "other",
        header_config("s-o", ["edge", "probe-0.27"], **changes),
        [row("7", "edge", True), row("7", "probe-0.27", True)],
    )

    result = report("--out", str(a), "--also", str(other))

    assert result.exit_code == 2
    assert f"{a} and {other} disagree on {named}" in result.stderr
    assert "not comparable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_also_without_report_is_refused(tmp_path: Path):
    a, _ = first_and_second(tmp_path)

    result = CliRunner().invoke(app, ["eval", "s-ab", "--out", str(tmp_path), "--also", str(a)])

    assert result.exit_code == 2
    assert "--also only goes with --report" in result.stderr
    assert not (tmp_path / "results.jsonl").exists()


def test_an_also_folder_without_results_is_refused(tmp_path: Path):
    a, _ = first_and_second(tmp_path)

    result = report("--out", str(a), "--also", str(tmp_path / "empty"))

    assert result.exit_code == 2
    assert f"no results in {tmp_path / 'empty' / 'results.jsonl'}" in result.stderr
