"""The evaluation's results file: one JSON line per (problem, strategy), fsynced at once,
after a header holding the run config (with the model pair that answers: the cloud's model
id and the edge model's SHA-256), so that an interrupted run resumes.

Format (``.jsonl``)::

    {"kind": "header", "version": 1, "created": "...", "config": {...}}
    {"kind": "row", "problem_id": "0", "strategy": "edge", ...}
    ...

When a pair appears twice (``retry_errors=True`` appends a new row after an error row) the
last row wins; when a header appears twice (rows added to the table) the last one does. A
resume may add rows to the table (new strategies or ``--variant`` names: a new header line
then names them all) or run only some of them, but never redefine a variant; any other
config change is refused unless ``restart=True``, and another model pair unless
``allow_mixed=True`` (each row names its pair, so mixed results stay apart).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from edge.datasets import EvalError, Problem
from edge.eval_report import normalise_config
from edge.grading import extract_boxed, grade_answer

FORMAT_VERSION = 1
PAIR_KEYS = ("cloud_model", "edge_model_sha256")
"""The run config's keys naming the model pair: another pair is refused unless allowed."""

ROW_KEYS = ("strategies", "variants")
"""The run config's keys naming the table's rows: a resume may add rows, never redefine one."""


@dataclass(frozen=True)
class Row:
    problem_id: str
    strategy: str
    level: int | None
    gold: str
    predicted: str | None
    correct: bool
    output_tokens: int
    edge_tokens: int
    cloud_tokens: int
    wall_s: float
    ttft_s: float | None
    tokens_per_s: float
    takeovers: int
    fallback: bool
    error: str | None
    finish_reason: str | None = None
    cloud_cached_tokens: int = 0
    cloud_prefill_tokens: int = 0
    text: str = ""  # the whole answer, so that it can be graded again without a re-run
    judge_calls: int = 0  # cloud-judge: probes judged, of them kept, the edge's wait for
    judge_accepts: int = 0  # the verdicts and the cloud's prefill of text and probe
    judge_wait_s: float = 0.0
    judge_prefill_s: float = 0.0
    cloud_model: str | None = None  # the pair that answered (set by run_eval from the run
    edge_model_sha256: str | None = None  # config), so that mixed results stay apart

    @property
    def key(self) -> tuple[str, str]:
        return (self.problem_id, self.strategy)

    def to_json(self) -> str:
        return json.dumps({"kind": "row", **asdict(self)}, ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Row:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})


def row_from_result(problem: Problem, strategy: str, result: dict[str, Any]) -> Row:
    """A graded row from the edge's JSON result object."""
    stats = result.get("stats") or {}
    edge_tokens = int(stats.get("edge_tokens", 0))
    cloud_tokens = int(stats.get("cloud_tokens", 0))
    output_tokens = edge_tokens + cloud_tokens
    wall_s = float(stats.get("wall_s", 0.0))
    text = str(result.get("text", ""))
    predicted = extract_boxed(text)
    ttft = stats.get("ttft_s")
    return Row(
        problem_id=problem.id,
        strategy=strategy,
        level=problem.level,
        gold=problem.answer,
        predicted=predicted,
        correct=grade_answer(predicted, problem.answer),
        output_tokens=output_tokens,
        edge_tokens=edge_tokens,
        cloud_tokens=cloud_tokens,
        wall_s=wall_s,
        ttft_s=float(ttft) if ttft is not None else None,
        tokens_per_s=output_tokens / wall_s if wall_s > 0 else 0.0,
        takeovers=int(stats.get("takeovers", 0)),
        fallback=bool(stats.get("fallback", False)),
        error=None,
        finish_reason=result.get("finish_reason"),
        cloud_cached_tokens=int(stats.get("cloud_cached_tokens", 0)),
        cloud_prefill_tokens=int(stats.get("cloud_prefill_tokens", 0)),
        text=text,
        judge_calls=int(stats.get("judge_calls", 0)),
        judge_accepts=int(stats.get("judge_accepts", 0)),
        judge_wait_s=float(stats.get("judge_wait_s", 0.0)),
        judge_prefill_s=float(stats.get("judge_prefill_s", 0.0)),
    )


def regrade(row: Row) -> Row:
    """The row judged again from its stored text (after a grader fix, say)."""
    if row.error is not None:
        return row
    predicted = extract_boxed(row.text)
    return dataclasses.replace(row, predicted=predicted, correct=grade_answer(predicted, row.gold))


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (an edge model), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def error_row(problem: Problem, strategy: str, exc: BaseException, wall_s: float) -> Row:
    """The row of a problem whose answer_fn raised: counted wrong, no tokens."""
    return Row(
        problem_id=problem.id,
        strategy=strategy,
        level=problem.level,
        gold=problem.answer,
        predicted=None,
        correct=False,
        output_tokens=0,
        edge_tokens=0,
        cloud_tokens=0,
        wall_s=wall_s,
        ttft_s=None,
        tokens_per_s=0.0,
        takeovers=0,
        fallback=False,
        error=f"{type(exc).__name__}: {exc}",
    )


# --------------------------------------------------------------------------- results file


def read_results(path: Path) -> tuple[dict[str, Any] | None, list[Row]]:
    """The header config (None if absent) and rows of a results file, last row per pair.

    A final line cut short by a crash is ignored; a bad line elsewhere is an error.
    """
    path = Path(path)
    if not path.exists():
        return None, []
    lines = path.read_text(encoding="utf-8").splitlines()
    config: dict[str, Any] | None = None
    by_key: dict[tuple[str, str], Row] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break  # torn final write
            raise EvalError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from e
        if obj.get("kind") == "header":
            config = obj.get("config", {})
        elif obj.get("kind") == "row":
            row = Row.from_dict(obj)
            by_key.pop(row.key, None)
            by_key[row.key] = row
    return config, list(by_key.values())


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _knobs_added_since(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new`'s policy without the knobs `old`'s policy predates that hold their defaults (a
    knob added to the method since, at its default, changes nothing the old rows ran)."""
    old_policy, new_policy = old.get("policy"), new.get("policy")
    if not isinstance(old_policy, dict) or not isinstance(new_policy, dict):
        return new
    from shared.policy import PolicyConfig

    defaults = normalise_config(dataclasses.asdict(PolicyConfig()))
    kept = {
        k: v
        for k, v in new_policy.items()
        if k in old_policy or k not in defaults or v != defaults[k]
    }
    return {**new, "policy": kept}


def _check_config(
    path: Path,
    old: dict[str, Any] | None,
    has_rows: bool,
    new: dict[str, Any],
    allow_mixed: bool = False,
) -> None:
    if old is None:
        if has_rows:
            raise EvalError(f"{path} has rows but no header; pass restart=True to start over")
        return
    old_n, new_n = normalise_config(old), normalise_config(new)
    new_n = _knobs_added_since(old_n, new_n)
    pair_diff = _config_diff(
        {k: old_n.get(k) for k in PAIR_KEYS}, {k: new_n.get(k) for k in PAIR_KEYS}
    )
    diff = _config_diff(
        {k: v for k, v in old_n.items() if k not in (*PAIR_KEYS, *ROW_KEYS)},
        {k: v for k, v in new_n.items() if k not in (*PAIR_KEYS, *ROW_KEYS)},
    )
    old_variants, new_variants = old_n.get("variants") or {}, new_n.get("variants") or {}
    diff += [
        f"variant {name!r}: {old_variants[name]!r} -> {knobs!r} (give the new one another name)"
        for name, knobs in new_variants.items()
        if name in old_variants and old_variants[name] != knobs
    ]
    if diff:
        raise EvalError(
            f"{path} was written with another config ({'; '.join(diff)}); "
            "use another output file or pass restart=True to discard it"
        )
    if pair_diff and has_rows and not allow_mixed:
        raise EvalError(
            f"{path} was answered by another model pair ({'; '.join(pair_diff)}); "
            "resuming would mix their results: use another output file, pass restart=True "
            "to discard it, or allow_mixed=True (--allow-mixed) to add this pair's rows "
            "(each row names its pair)"
        )


def with_all_rows(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` (a checked stored config) naming the rows of both: its strategies then the new
    ones, its variants and the new ones. Equal to `old` when `new` adds no row."""
    merged = normalise_config(old)
    new_n = normalise_config(new)
    if "strategies" in merged or "strategies" in new_n:
        strategies = merged.get("strategies") or []
        added = [s for s in new_n.get("strategies") or [] if s not in strategies]
        merged["strategies"] = strategies + added
    if "variants" in merged or "variants" in new_n:
        merged["variants"] = {**(new_n.get("variants") or {}), **(merged.get("variants") or {})}
    return merged


def open_results(
    path: Path, config: dict[str, Any], restart: bool, allow_mixed: bool = False
) -> tuple[TextIO, list[Row], dict[str, Any]]:
    """Open the results file for appending, checking or writing its header; also return the
    config the file now stands for (with every row it holds or will hold)."""
    path = Path(path)
    old_config, rows = (None, []) if restart else read_results(path)
    if not restart:
        _check_config(path, old_config, bool(rows), config, allow_mixed)
    fresh = restart or old_config is None or not rows  # no rows: the header is rewritten
    if restart and path.exists():
        path.replace(path.with_name(path.name + ".bak"))
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    f = path.open("w" if fresh else "a", encoding="utf-8")
    kept = None if fresh else old_config
    stored = normalise_config(config) if kept is None else with_all_rows(kept, config)
    if kept is None or stored != normalise_config(kept):
        header = {
            "kind": "header",
            "version": FORMAT_VERSION,
            "config": stored,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        append_line(f, json.dumps(header, ensure_ascii=False))
    return f, rows, stored


def _repair_tail(path: Path) -> None:
    """Make the file end with a newline so appends stay valid after a crash mid-write.

    A final line that parses is completed with its newline; one that does not is cut.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:
        path.write_bytes(data[:cut])
    else:
        path.write_bytes(data + b"\n")


def append_line(f: TextIO, line: str) -> None:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())
