"""Paired comparisons in the eval report: on the same problems, where a strategy is right
and its baseline wrong (and the reverse), with the exact McNemar p that says whether an
accuracy difference is more than the luck of which problems were drawn."""

from __future__ import annotations

import pytest

from edge.eval_report import accuracy_by_level, format_paired, mcnemar_p, paired
from edge.eval_results import Row


def row(problem: str, strategy: str, correct: bool, level: int | None = 1) -> Row:
    return Row(
        problem_id=problem,
        strategy=strategy,
        level=level,
        gold="1",
        predicted="1" if correct else "2",
        correct=correct,
        output_tokens=10,
        edge_tokens=10,
        cloud_tokens=0,
        wall_s=1.0,
        ttft_s=None,
        tokens_per_s=10.0,
        takeovers=0,
        fallback=False,
        error=None,
    )


@pytest.mark.parametrize(
    ("wins", "losses", "p"),
    [
        (0, 0, 1.0),  # no discordant problem: no evidence either way
        (9, 1, 22 / 1024),  # 2 x (C(10,0) + C(10,1)) / 2^10
        (1, 9, 22 / 1024),  # two-sided: the same either way round
        (7, 2, 2 * 46 / 512),  # 2 x (1 + 9 + 36) / 2^9
        (5, 5, 1.0),  # an even split is capped at 1
        (6, 0, 2 / 64),
    ],
)
def test_mcnemar_exact_p(wins: int, losses: int, p: float) -> None:
    assert mcnemar_p(wins, losses) == pytest.approx(p)


def test_paired_counts_only_problems_both_answered() -> None:
    rows = [
        row("a", "edge", False),
        row("a", "cloud", True),  # win
        row("b", "edge", True),
        row("b", "cloud", False),  # loss
        row("c", "edge", False),
        row("c", "cloud", False),  # tie: not discordant
        row("d", "cloud", True),  # the edge never answered d
    ]
    result = paired(rows, "edge")
    assert set(result) == {"cloud"}
    cloud = result["cloud"]
    assert (cloud.problems, cloud.wins, cloud.losses) == (3, 1, 1)
    assert cloud.p_value == 1.0
    assert paired(rows, "missing") == {}


def test_accuracy_by_level_skips_rows_without_a_level() -> None:
    rows = [
        row("a", "edge", True, level=1),
        row("b", "edge", False, level=1),
        row("c", "edge", True, level=3),
        row("d", "edge", True, level=None),
    ]
    assert accuracy_by_level(rows) == {"edge": {1: (1, 2), 3: (1, 1)}}


def test_format_paired_needs_two_strategies() -> None:
    assert format_paired([row("a", "edge", True)]) == ""
    text = format_paired([row("a", "edge", False), row("a", "cloud", True)])
    assert "level 1 right" in text and "+1 / -0, p=1.00" in text
