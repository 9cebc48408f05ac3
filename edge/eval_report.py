"""The evaluation's report: per-strategy summaries, the paper-shaped table, the JSON report
and the accuracy-versus-speed plot with its Pareto front. Reads rows; knows nothing about
models, gRPC or the results file (`edge.eval_results` writes and reads those).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge.eval_results import Row

STRATEGIES: tuple[str, ...] = ("edge", "speculative", "cloud")
"""Known strategies, in the order the table lists them (small alone, both, large alone)."""


def normalise_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run config as JSON would give it back (sorted keys, tuples as lists, paths as str)."""
    normalised: dict[str, Any] = json.loads(json.dumps(config, sort_keys=True, default=str))
    return normalised


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class StrategySummary:
    """One strategy's numbers. Accuracy counts every row (errors are wrong); the token and
    speed columns are over the rows that finished without error."""

    strategy: str
    n: int
    correct: int
    accuracy_pct: float
    avg_tokens: float
    mean_wall_s: float
    tokens_per_s: float
    mean_tokens_per_s: float
    mean_ttft_s: float | None
    cloud_share_pct: float
    takeovers_per_problem: float
    fallbacks: int
    errors: int


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _strategy_order(rows: Iterable[Row], order: Sequence[str] = ()) -> list[str]:
    """The strategies of `rows`: those named in `order` first, in its order, then edge,
    speculative, cloud, then the others by name."""
    seen = list(dict.fromkeys(r.strategy for r in rows))
    first = [s for s in order if s in seen]
    known = [s for s in STRATEGIES if s in seen and s not in first]
    return first + known + sorted(s for s in seen if s not in STRATEGIES and s not in first)


def summarize_strategy(strategy: str, rows: Sequence[Row]) -> StrategySummary:
    ok = [r for r in rows if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    wall = sum(r.wall_s for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    correct = sum(r.correct for r in rows)
    return StrategySummary(
        strategy=strategy,
        n=len(rows),
        correct=correct,
        accuracy_pct=100.0 * correct / len(rows) if rows else 0.0,
        avg_tokens=_mean([r.output_tokens for r in ok]),
        mean_wall_s=_mean([r.wall_s for r in ok]),
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        mean_tokens_per_s=_mean([r.tokens_per_s for r in ok]),
        mean_ttft_s=_mean(ttfts) if ttfts else None,
        cloud_share_pct=100.0 * sum(r.cloud_tokens for r in ok) / tokens if tokens else 0.0,
        takeovers_per_problem=_mean([r.takeovers for r in ok]),
        fallbacks=sum(r.fallback for r in rows),
        errors=len(rows) - len(ok),
    )


def summarize(rows: Sequence[Row], order: Sequence[str] = ()) -> list[StrategySummary]:
    """Per-strategy summaries, ordered as `order` names them, then edge, speculative, cloud,
    then any others."""
    return [
        summarize_strategy(s, [r for r in rows if r.strategy == s])
        for s in _strategy_order(rows, order)
    ]


@dataclass(frozen=True)
class AgainstBaselines:
    """Where a strategy lies between the small model alone and the large one alone."""

    gap_closed_pct: float | None  # (acc - edge) / (cloud - edge) x 100; None without a gap
    speed_vs_cloud: float | None  # its tok/s over cloud-only tok/s


def against_baselines(summaries: Sequence[StrategySummary]) -> dict[str, AgainstBaselines]:
    """Per strategy, the share of the edge-to-cloud accuracy gap it closes and its speed
    relative to the cloud alone; empty unless both the edge and cloud rows are there."""
    by_name = {s.strategy: s for s in summaries}
    edge, cloud = by_name.get("edge"), by_name.get("cloud")
    if edge is None or cloud is None:
        return {}
    gap = cloud.accuracy_pct - edge.accuracy_pct
    return {
        s.strategy: AgainstBaselines(
            gap_closed_pct=100.0 * (s.accuracy_pct - edge.accuracy_pct) / gap if gap > 0 else None,
            speed_vs_cloud=s.tokens_per_s / cloud.tokens_per_s if cloud.tokens_per_s > 0 else None,
        )
        for s in summaries
    }


_BASELINE_HEADER = ("gap closed %", "x cloud tok/s")

_TABLE_HEADER = (
    "strategy",
    "n",
    "accuracy % / avg tokens",
    "s/problem",
    "tok/s (total)",
    "tok/s (mean)",
    "TTFT s",
    "cloud share %",
    "takeovers/problem",
    "fallbacks",
    "errors",
)


def _table_cells(s: StrategySummary) -> tuple[str, ...]:
    ttft = "-" if s.mean_ttft_s is None else f"{s.mean_ttft_s:.2f}"
    return (
        s.strategy,
        str(s.n),
        f"{s.accuracy_pct:.1f} / {s.avg_tokens:.0f}",
        f"{s.mean_wall_s:.1f}",
        f"{s.tokens_per_s:.1f}",
        f"{s.mean_tokens_per_s:.1f}",
        ttft,
        f"{s.cloud_share_pct:.1f}",
        f"{s.takeovers_per_problem:.1f}",
        str(s.fallbacks),
        str(s.errors),
    )


def _baseline_cells(b: AgainstBaselines) -> tuple[str, ...]:
    gap = "-" if b.gap_closed_pct is None else f"{b.gap_closed_pct:.0f}"
    speed = "-" if b.speed_vs_cloud is None else f"{b.speed_vs_cloud:.2f}"
    return gap, speed


def format_table(summaries: Sequence[StrategySummary]) -> str:
    """A Markdown table shaped like the paper's, one row per strategy; with edge and cloud
    rows, two more columns: the share of their accuracy gap closed, the speed over cloud's."""
    relative = against_baselines(summaries)
    header = _TABLE_HEADER + (_BASELINE_HEADER if relative else ())
    rows = [
        header,
        *(
            _table_cells(s) + (_baseline_cells(relative[s.strategy]) if relative else ())
            for s in summaries
        ),
    ]
    return _markdown(rows)


# --------------------------------------------------------------------------- paired


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar p: the chance of a split at least this uneven of the
    wins + losses discordant problems if either side were equally likely to win each."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """A strategy against a baseline over the problems both answered: right where the
    baseline is wrong (wins), wrong where it is right (losses), and McNemar's p."""

    strategy: str
    baseline: str
    problems: int
    wins: int
    losses: int
    p_value: float


def paired(rows: Sequence[Row], baseline: str, order: Sequence[str] = ()) -> dict[str, Paired]:
    """Every other strategy paired problem by problem with `baseline` (empty without it)."""
    right = {(r.problem_id, r.strategy): r.correct for r in rows}
    base = {pid: ok for (pid, s), ok in right.items() if s == baseline}
    out: dict[str, Paired] = {}
    for strategy in _strategy_order(rows, order):
        if strategy == baseline or not base:
            continue
        both = [(ok, base[pid]) for (pid, s), ok in right.items() if s == strategy and pid in base]
        wins = sum(ok and not b for ok, b in both)
        losses = sum(b and not ok for ok, b in both)
        out[strategy] = Paired(strategy, baseline, len(both), wins, losses, mcnemar_p(wins, losses))
    return out


def accuracy_by_level(rows: Sequence[Row]) -> dict[str, dict[int, tuple[int, int]]]:
    """Per strategy and MATH level: (right, answered). Rows without a level are left out."""
    out: dict[str, dict[int, tuple[int, int]]] = {}
    for r in rows:
        if r.level is None:
            continue
        right, n = out.setdefault(r.strategy, {}).get(r.level, (0, 0))
        out[r.strategy][r.level] = (right + r.correct, n + 1)
    return out


def format_paired(
    rows: Sequence[Row], order: Sequence[str] = (), versus: Sequence[str] = ()
) -> str:
    """A Markdown table: accuracy per level, then each strategy paired with the edge alone,
    the cloud alone and each `versus` row (+wins / -losses, exact McNemar p), in the order
    of `summarize`. Empty for a single row."""
    levels = sorted({r.level for r in rows if r.level is not None})
    by_level = accuracy_by_level(rows)
    named = dict.fromkeys(("edge", "cloud", *versus))
    baselines = [b for b in named if any(r.strategy == b for r in rows)]
    pairs = {b: paired(rows, b, order) for b in baselines}
    header = (
        "strategy",
        *(f"level {lv} right" for lv in levels),
        *(f"vs {b}: +/-, p" for b in baselines),
    )
    table = [header]
    for strategy in _strategy_order(rows, order):
        cells = [strategy]
        for lv in levels:
            right, n = by_level.get(strategy, {}).get(lv, (0, 0))
            cells.append(f"{right}/{n}")
        for b in baselines:
            x = pairs[b].get(strategy)
            cells.append("-" if x is None else f"+{x.wins} / -{x.losses}, p={_p(x.p_value)}")
        table.append(tuple(cells))
    if len(table) < 3:
        return ""
    return _markdown(table)


def format_judge(rows: Sequence[Row], order: Sequence[str] = ()) -> str:
    """A Markdown table of what the cloud worked for, per row that used it, beside each
    other when one row used the cloud judge: tokens the cloud prefilled per problem, and
    for the judge's rows the breaks judged per problem, the share kept, the edge's wait
    per judged break and the cloud's prefill per judged break (of text and probe). Empty
    when no row judged."""
    if not any(r.judge_calls for r in rows):
        return ""
    table: list[tuple[str, ...]] = [
        (
            "strategy",
            "cloud prefilled tokens/problem",
            "judged breaks/problem",
            "kept %",
            "edge wait s / judged break",
            "cloud prefill s / judged break",
        )
    ]
    for strategy in _strategy_order(rows, order):
        mine = [r for r in rows if r.strategy == strategy and r.error is None]
        if not mine or strategy == "edge":
            continue
        calls = sum(r.judge_calls for r in mine)
        prefilled = f"{sum(r.cloud_prefill_tokens for r in mine) / len(mine):.0f}"
        if not calls:
            table.append((strategy, prefilled, "-", "-", "-", "-"))
            continue
        table.append(
            (
                strategy,
                prefilled,
                f"{calls / len(mine):.1f}",
                f"{100 * sum(r.judge_accepts for r in mine) / calls:.1f}",
                f"{sum(r.judge_wait_s for r in mine) / calls:.2f}",
                f"{sum(r.judge_prefill_s for r in mine) / calls:.2f}",
            )
        )
    return _markdown(table)


def _p(p_value: float) -> str:
    """Two decimals; three below 0.01, so that a strong result does not read as p=0.00."""
    return f"{p_value:.3f}" if p_value < 0.01 else f"{p_value:.2f}"


def _markdown(table: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])


def write_report(
    summaries: Sequence[StrategySummary],
    rows: Sequence[Row],
    json_path: Path,
    run_config: dict[str, Any] | None = None,
) -> None:
    """Summaries, per-problem rows and the run config as one JSON document."""
    report = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": normalise_config(run_config or {}),
        "model_pairs": model_pairs(rows),
        "summaries": [asdict(s) for s in summaries],
        "against_baselines": {k: asdict(v) for k, v in against_baselines(summaries).items()},
        "paired": {
            b: {k: asdict(v) for k, v in paired(rows, b).items()} for b in ("edge", "cloud")
        },
        "accuracy_by_level": {
            s: {str(lv): {"right": c, "n": n} for lv, (c, n) in sorted(levels.items())}
            for s, levels in accuracy_by_level(rows).items()
        },
        "rows": [asdict(r) for r in rows],
    }
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def model_pairs(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The (cloud model, edge model checksum) pairs that answered these rows, with their
    row counts: one pair, unless a run was resumed with allow_mixed."""
    counts: dict[tuple[str | None, str | None], int] = {}
    for r in rows:
        key = (r.cloud_model, r.edge_model_sha256)
        counts[key] = counts.get(key, 0) + 1
    return [
        {"cloud_model": cloud, "edge_model_sha256": edge, "rows": n}
        for (cloud, edge), n in counts.items()
    ]


# --------------------------------------------------------------------------- plot


def pareto_front(summaries: Sequence[StrategySummary]) -> list[StrategySummary]:
    """Summaries no other beats on both speed and accuracy, by ascending speed."""

    def dominated(a: StrategySummary) -> bool:
        return any(
            b.tokens_per_s >= a.tokens_per_s
            and b.accuracy_pct >= a.accuracy_pct
            and (b.tokens_per_s > a.tokens_per_s or b.accuracy_pct > a.accuracy_pct)
            for b in summaries
        )

    return sorted((s for s in summaries if not dominated(s)), key=lambda s: s.tokens_per_s)


def _staircase(front: Sequence[StrategySummary]) -> tuple[list[float], list[float]]:
    """Corner points of the front's step line: down from each point, then right."""
    xs: list[float] = []
    ys: list[float] = []
    for i, s in enumerate(front):
        if i:
            xs.append(front[i - 1].tokens_per_s)
            ys.append(s.accuracy_pct)
        xs.append(s.tokens_per_s)
        ys.append(s.accuracy_pct)
    return xs, ys


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy, in percent (0, 0 for n = 0)."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def plot(
    summaries: Sequence[StrategySummary],
    png_path: Path,
    dataset: str = "",
    date: str | None = None,
) -> None:
    """Accuracy % against tokens/s: one point per strategy, named in the legend, with its
    95 % interval (Wilson) as a bar; the Pareto front stepped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    try:
        for s in summaries:
            low, high = wilson_interval(s.correct, s.n)
            ax.errorbar(
                [s.tokens_per_s],
                [s.accuracy_pct],
                yerr=[[s.accuracy_pct - low], [high - s.accuracy_pct]],
                fmt="o",
                markersize=7,
                capsize=3,
                alpha=0.9,
                zorder=3,
                label=f"{s.strategy} ({s.accuracy_pct:.0f} %, {s.tokens_per_s:.1f} tok/s)",
            )
        xs, ys = _staircase(pareto_front(summaries))
        ax.plot(xs, ys, linestyle="--", color="grey", zorder=2, label="Pareto front")
        ax.set_xlabel("output tokens / s (wall clock)")
        ax.set_ylabel("accuracy % (bars: 95 % interval)")
        when = date or datetime.now(UTC).date().isoformat()
        problems = max((s.n for s in summaries), default=0)
        ax.set_title(f"Accuracy vs speed — {dataset or 'benchmark'}, {problems} problems — {when}")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.15)
        ax.set_ylim(-3, 103)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
        png_path = Path(png_path)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png_path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
