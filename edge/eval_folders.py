"""The rows of one `eval --report` table read from one or more results folders (`--out` and
each `--also`), and the rows of it asked for (`--strategy`).

Boundary: reads DIR/results.jsonl files through `edge.eval_results.read_results`, checks that
their headers agree on what makes rows comparable (the model pair, the sampling, the token
budget, the mode, and the policy of every speculative row found in two folders), refuses a
(problem, strategy) found in two folders, and returns the chosen rows with the run config
that report.json records. Writes nothing: the table and its files are `eval_command`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.datasets import EvalError
from edge.eval_report import normalise_config
from edge.eval_results import Row, read_results
from edge.options import Strategy
from edge.outcome import EdgeError

COMPARABLE_KEYS = (
    "cloud_model",
    "edge_model_sha256",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "mode",
)
"""The header keys two folders must agree on for their rows to share a table."""

WITHOUT_POLICY = (Strategy.EDGE, Strategy.CLOUD)
"""The rows no policy steers: every other row (speculative, each variant) has one."""


@dataclass(frozen=True)
class FolderResults:
    """One folder's results file as read: its header config and its rows."""

    folder: Path
    config: dict[str, Any]
    rows: list[Row]

    @property
    def strategies(self) -> list[str]:
        """The rows of its table: those its header names (else those it holds)."""
        return list(self.config.get("strategies") or dict.fromkeys(r.strategy for r in self.rows))

    @property
    def present(self) -> list[str]:
        """Every row it names or holds."""
        return list(dict.fromkeys([*self.strategies, *(r.strategy for r in self.rows)]))


@dataclass(frozen=True)
class ReportRows:
    """What one table is made of: the rows read, the strategies it counts (in order), the
    run config report.json records and the results files read."""

    rows: list[Row]
    strategies: list[str]
    config: dict[str, Any]
    results_files: list[Path]


def report_rows(
    out_dir: Path, also: list[Path], chosen: list[str] | None, table_name: str
) -> ReportRows:
    """The rows of OUT_DIR/results.jsonl (if there is one) and of each ALSO/results.jsonl
    (which must exist), checked to be comparable; only the `chosen` strategies when given,
    else every strategy the headers name. Raises EdgeError with one line."""
    folders = _read_folders(out_dir, also)
    _check_comparable(folders)
    rows = _merged_rows(folders)
    if chosen is None:
        strategies = list(dict.fromkeys(s for f in folders for s in f.strategies))
    else:
        strategies = _chosen(chosen, list(dict.fromkeys(s for f in folders for s in f.present)))
        rows = [r for r in rows if r.strategy in strategies]
    config = _table_config(folders, strategies, table_name)
    return ReportRows(rows, strategies, config, [f.folder / "results.jsonl" for f in folders])


def _read_folders(out_dir: Path, also: list[Path]) -> list[FolderResults]:
    folders: list[FolderResults] = []
    seen: set[Path] = set()
    for folder in [out_dir, *also]:
        if folder.resolve() in seen:
            continue  # --out named again as --also: read once
        seen.add(folder.resolve())
        results = folder / "results.jsonl"
        try:
            config, rows = read_results(results)
        except EvalError as exc:
            raise EdgeError(str(exc)) from None
        if config is None or not rows:
            if folder == out_dir and also:
                continue  # the report goes to --out; its rows come from --also alone
            raise EdgeError(f"no results in {results}: run the eval first")
        folders.append(FolderResults(folder, normalise_config(config), rows))
    return folders


def _check_comparable(folders: list[FolderResults]) -> None:
    first = folders[0]
    for other in folders[1:]:
        for key in COMPARABLE_KEYS:
            a, b = first.config.get(key), other.config.get(key)
            if a != b:
                raise EdgeError(
                    f"{first.folder} and {other.folder} disagree on {key} ({a!r} vs {b!r}): "
                    "their rows are not comparable"
                )
    for i, one in enumerate(folders):
        for other in folders[i + 1 :]:
            for strategy in one.present:
                if strategy in WITHOUT_POLICY or strategy not in other.present:
                    continue
                a, b = _policy(one.config, strategy), _policy(other.config, strategy)
                diff = [
                    f"{k}: {a.get(k)!r} vs {b.get(k)!r}"
                    for k in sorted({*a, *b})
                    if a.get(k) != b.get(k)
                ]
                if diff:
                    raise EdgeError(
                        f"{one.folder} and {other.folder} disagree on the policy of "
                        f"{strategy!r} ({'; '.join(diff)}): their rows are not comparable"
                    )


def _policy(config: dict[str, Any], strategy: str) -> dict[str, Any]:
    """Every knob of the policy a speculative row ran with: the header's policy, with the
    variant's overrides for a variant's row, as the policy module reads them."""
    from shared.policy import PolicyConfigError
    from shared.policy_config import config_from_mapping

    knobs = {**(config.get("policy") or {}), **(config.get("variants") or {}).get(strategy, {})}
    try:
        return normalise_config(vars(config_from_mapping(knobs)))
    except PolicyConfigError:  # a knob this version no longer has: compare as written
        return normalise_config(knobs)


def _merged_rows(folders: list[FolderResults]) -> list[Row]:
    where: dict[tuple[str, str], Path] = {}
    rows: list[Row] = []
    for f in folders:
        for r in f.rows:
            if r.key in where:
                raise EdgeError(
                    f"problem {r.problem_id!r} under {r.strategy!r} is in both "
                    f"{where[r.key]} and {f.folder}: a row may come from one folder only"
                )
            where[r.key] = f.folder
            rows.append(r)
    return rows


def _chosen(chosen: list[str], available: list[str]) -> list[str]:
    unknown = [s for s in chosen if s not in available]
    if not chosen or unknown:
        raise EdgeError(
            f"--strategy {','.join(unknown) or '(none)'}: the results hold {', '.join(available)}"
        )
    return list(dict.fromkeys(chosen))


def _table_config(
    folders: list[FolderResults], strategies: list[str], table_name: str
) -> dict[str, Any]:
    """The first folder's config naming the table's rows and the folders read; from several
    folders, the table's name as its dataset (each folder's under `datasets`) and the policy
    of the folder whose speculative rows it counts."""
    config = dict(folders[0].config)
    config["results_folders"] = [str(f.folder) for f in folders]
    if config.get("strategies") == strategies and len(folders) == 1:
        return config  # the header's own table
    variants: dict[str, Any] = {}
    for f in folders:
        for name, knobs in (f.config.get("variants") or {}).items():
            if name in strategies:
                variants.setdefault(name, knobs)
    config.update(strategies=strategies, variants=variants)
    if len(folders) > 1:
        speculative = [f for f in folders if Strategy.SPECULATIVE in f.present]
        config.update(
            dataset=table_name,
            datasets=[f.config.get("dataset") for f in folders],
            policy=(speculative or folders)[0].config.get("policy"),
        )
    return config
