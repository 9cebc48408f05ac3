"""Benchmark evaluation: datasets, grading with math-verify, per-problem results that resume; the report table and the trade-off plot live in `edge.eval_report`. Knows nothing about models or gRPC.

Pieces, in the order a run uses them:

* ``load_problems``: MATH-500 / AIME 2024 JSON Lines into ``Problem`` records.
* ``math_prompt``: the paper's user prompt. The ``<think>\\n`` that follows it in the paper
  is not part of it: a reasoning model's answer opens its think block in the assistant
  text (see ``shared.prompting``).
* ``extract_boxed`` / ``grade``: the last ``\\boxed{...}`` of an output, judged against the
  gold answer by ``math_verify`` (never a home-made string matcher).
* ``run_eval``: answers every (problem, strategy) pair through an ``AnswerFn`` and appends
  one JSON line per pair to a results file, fsynced at once: the grade, the counts, and
  the answer's text (so ``regrade`` can judge it again without a re-run). The first line
  of that file is a header holding the run config, including the model pair that answers:
  the cloud's model id (GetModelInfo) and the edge model's SHA-256. Rerunning with the
  same file skips the pairs already there, so an interrupted run resumes. A resume may
  add rows to the table (new strategies or ``--variant`` names: a new header line then
  names them all) or run only some of them, but never redefine a variant; any other
  config change is refused unless ``restart=True``, and another model pair unless
  ``allow_mixed=True`` (each row names its pair, so mixed results stay apart).
* ``summarize`` / ``format_table`` / ``write_report`` / ``plot`` (from ``edge.eval_report``):
  the paper-shaped table (accuracy % / average output tokens) plus the measured speed
  columns, a JSON report and an accuracy-versus-tokens/s plot with its Pareto front.

Results file format (``.jsonl``)::

    {"kind": "header", "version": 1, "created": "...", "config": {...}}
    {"kind": "row", "problem_id": "0", "strategy": "edge", ...}
    ...

When a pair appears twice (``retry_errors=True`` appends a new row after an error row) the
last row wins; when a header appears twice (rows added to the table) the last one does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from edge.eval_report import (  # noqa: F401  (the report is part of this module's API)
    STRATEGIES,
    StrategySummary,
    format_paired,
    format_table,
    model_pairs,
    normalise_config,
    pareto_front,
    plot,
    summarize,
    summarize_strategy,
    write_report,
)

AnswerFn = Callable[[str, str], dict]
"""``answer_fn(prompt_text, strategy) -> edge result object``; may raise for a failed problem."""

PROMPT_TEMPLATE = (
    "Please reason step by step, and put your final answer within \\boxed{{}}. {problem}"
)
FORMAT_VERSION = 1
GRADE_TIMEOUT_S = 5
PAIR_KEYS = ("cloud_model", "edge_model_sha256")
"""The run config's keys naming the model pair: another pair is refused unless allowed."""

ROW_KEYS = ("strategies", "variants")
"""The run config's keys naming the table's rows: a resume may add rows, never redefine one."""


class EvalError(Exception):
    """A problem with the evaluation's inputs or results file, stated for a person."""


class EvalInterrupted(KeyboardInterrupt):
    """Raised by ``run_eval`` on Ctrl-C after the results file is closed.

    Still a ``KeyboardInterrupt`` (so an unprepared caller stops as usual); ``rows`` holds
    every finished row of this run's problems for every strategy of the table, including
    those from earlier runs.
    """

    def __init__(self, rows: list[Row]) -> None:
        super().__init__(f"interrupted after {len(rows)} finished rows")
        self.rows = rows


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    level: int | None = None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EvalError(f"dataset not found: {path}")
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise EvalError(f"{path}: line {lineno} is not a JSON object")
            records.append(obj)
    return records


def _to_problem(obj: dict[str, Any], index: int, path: Path) -> Problem:
    try:
        problem, answer = str(obj["problem"]), str(obj["answer"])
    except KeyError as e:
        raise EvalError(f"{path}: record {index + 1} lacks field {e.args[0]!r}") from e
    pid = str(obj["id"]) if "id" in obj else str(index)
    level = obj.get("level")
    return Problem(id=pid, problem=problem, answer=answer, level=int(level) if level else None)


def load_problems(path: Path, levels: set[int] | None, limit: int | None) -> list[Problem]:
    """Problems of a JSON Lines dataset, filtered by level, the first ``limit`` kept.

    MATH-500 has no id: the 0-based line index is used. AIME has ``id`` and no level, so
    asking it for levels is an error rather than an empty run.
    """
    path = Path(path)
    problems = [_to_problem(o, i, path) for i, o in enumerate(_read_jsonl(path))]
    if levels:
        if all(p.level is None for p in problems):
            raise EvalError(f"{path}: the dataset has no levels; drop the level filter")
        problems = [p for p in problems if p.level in levels]
    return problems[:limit] if limit is not None else problems


def math_prompt(problem: Problem | str) -> str:
    """The paper's math prompt. The caller's chat template adds ``<think>\\n`` after it."""
    text = problem.problem if isinstance(problem, Problem) else problem
    return PROMPT_TEMPLATE.format(problem=text)


# --------------------------------------------------------------------------- grading

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the ``{...}`` opening at ``text[start]``, or None when never closed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _box_content(text: str, after: int) -> str | None:
    """What a box command whose name ends at ``after`` holds, or None if not a box."""
    rest = text[after:]
    stripped = rest.lstrip(" ")
    if stripped.startswith("{"):
        return _balanced_group(text, after + len(rest) - len(stripped))
    if rest.startswith(" ") and stripped:  # "\boxed 5$": up to "$" or end of line
        return stripped.split("$")[0].split("\n")[0].strip().rstrip(".")
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the LAST complete ``\\boxed{...}`` / ``\\boxed ...`` / ``\\fbox{...}``.

    Braces are balanced, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. A box that is
    never closed (an output cut off by the token budget) is skipped in favour of the one
    before it. None when there is no complete box.
    """
    positions = sorted((i, cmd) for cmd in _BOX_COMMANDS for i in _find_all(text, cmd))
    for i, cmd in reversed(positions):
        end = i + len(cmd)
        if end < len(text) and text[end].isalpha():  # e.g. "\boxedx" is another command
            continue
        content = _box_content(text, end)
        if content is not None:
            return content.strip()
    return None


def _find_all(text: str, needle: str) -> Iterable[int]:
    i = text.find(needle)
    while i != -1:
        yield i
        i = text.find(needle, i + 1)


def _grade_timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only works on the main thread."""
    return GRADE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def grade_answer(predicted: str | None, gold: str) -> bool:
    """Whether an extracted answer equals the gold answer, as judged by math-verify."""
    if predicted is None or not predicted.strip():
        return False
    from math_verify import parse, verify

    timeout = _grade_timeout()
    parse_timeout = timeout if timeout is not None else 0
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=parse_timeout)
    pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=parse_timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def grade(output_text: str, gold: str) -> bool:
    """Whether the last box of a model output equals ``gold``. No box means wrong."""
    return grade_answer(extract_boxed(output_text), gold)


# --------------------------------------------------------------------------- rows


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


def _open_results(
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
        _append_line(f, json.dumps(header, ensure_ascii=False))
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


def _append_line(f: TextIO, line: str) -> None:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


# --------------------------------------------------------------------------- progress


class Progress:
    """Progress with accuracy and ETA: a one-line ``\\r`` bar on a terminal; elsewhere (a
    log, ``nohup``) one plain line per answered row, saying which it was and how it went."""

    def __init__(
        self, total: int, already: int, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.total, self.done, self.correct = total, already, 0
        self.graded, self.new, self.seconds = 0, 0, 0.0

    def count_existing(self, rows: Sequence[Row]) -> None:
        self.graded += len(rows)
        self.correct += sum(r.correct for r in rows)

    def update(self, row: Row, seconds: float) -> None:
        self.done, self.new, self.seconds = self.done + 1, self.new + 1, self.seconds + seconds
        self.graded, self.correct = self.graded + 1, self.correct + row.correct
        if self.enabled and not self.tty:
            verdict = "error" if row.error else "right" if row.correct else "wrong"
            self.stream.write(
                f"{self.line()}  {row.strategy} on {row.problem_id}: {verdict}, "
                f"{row.output_tokens} tokens in {seconds:.1f} s\n"
            )
            self.stream.flush()
        self._draw()

    def line(self) -> str:
        acc = 100.0 * self.correct / self.graded if self.graded else 0.0
        eta = (self.total - self.done) * self.seconds / self.new if self.new else math.nan
        eta_txt = "?" if math.isnan(eta) else _duration(eta)
        return f"{self.done}/{self.total}  acc {acc:5.1f}%  ETA {eta_txt}"

    def _draw(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + self.line() + "   ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------- the run


def _answer_one(problem: Problem, strategy: str, answer_fn: AnswerFn) -> tuple[Row, float]:
    start = time.monotonic()
    try:
        result = answer_fn(math_prompt(problem), strategy)
        row = row_from_result(problem, strategy, result)
    except Exception as exc:  # a failed problem is a wrong answer, the run goes on
        row = error_row(problem, strategy, exc, time.monotonic() - start)
    return row, time.monotonic() - start


def run_eval(
    problems: Sequence[Problem],
    strategies: list[str],
    answer_fn: AnswerFn,
    out_path: Path,
    progress: bool,
    run_config: dict[str, Any] | None = None,
    restart: bool = False,
    retry_errors: bool = False,
    progress_stream: TextIO | None = None,
    allow_mixed: bool = False,
) -> list[Row]:
    """Answer every (problem, strategy) pair not yet in ``out_path``; return the rows of
    these problems for every strategy of the table (``strategies`` and any the file held
    already), in table order.

    Problems are the outer loop, so an interrupted run has compared strategies on the same
    problems. Each row is appended and fsynced as soon as it is graded. ``run_config``
    (dataset, levels, seed, max_tokens, mode, policy knobs, and the model pair under
    ``PAIR_KEYS``) is stored in the header; resuming under another config raises
    ``EvalError`` unless ``restart=True``, which moves the old file to ``<name>.bak`` and
    starts over (new strategies and variants are not another config: they add rows to the
    table, and the header is appended again naming them all); under another model pair
    unless ``allow_mixed=True``. Each new row records the pair that answered it.
    ``retry_errors`` answers again the pairs whose stored row is an error. On Ctrl-C the file is closed and
    ``EvalInterrupted`` (a ``KeyboardInterrupt`` carrying the finished rows) is raised.
    """
    wanted = [(p, s) for p in problems for s in strategies]
    config = run_config or {}
    f, existing, stored = _open_results(Path(out_path), config, restart, allow_mixed)
    table = list(dict.fromkeys([*(stored.get("strategies") or []), *strategies]))
    in_table = [(p, s) for p in problems for s in table]
    pair: dict[str, str | None] = {k: config.get(k) for k in PAIR_KEYS}
    done = {r.key: r for r in existing}
    todo = [(p, s) for p, s in wanted if _needs_answer(done.get((p.id, s)), retry_errors)]
    bar = Progress(len(wanted), len(wanted) - len(todo), progress_stream, enabled=progress)
    todo_keys = {(p.id, s) for p, s in todo}
    bar.count_existing([r for r in _rows_for(wanted, done) if r.key not in todo_keys])
    try:
        for problem, strategy in todo:
            row, seconds = _answer_one(problem, strategy, answer_fn)
            row = dataclasses.replace(
                row, cloud_model=pair["cloud_model"], edge_model_sha256=pair["edge_model_sha256"]
            )
            _append_line(f, row.to_json())
            done[row.key] = row
            bar.update(row, seconds)
    except KeyboardInterrupt:
        raise EvalInterrupted(_rows_for(in_table, done)) from None
    finally:
        f.close()
        bar.close()
    return _rows_for(in_table, done)


def answered_by_all(rows: Sequence[Row], strategies: Sequence[str]) -> tuple[list[Row], int]:
    """The rows of the problems that every one of `strategies` has answered (each strategy
    then counts the same problems), and how many rows were left out."""
    wanted = set(strategies)
    seen: dict[str, set[str]] = {}
    for r in rows:
        seen.setdefault(r.problem_id, set()).add(r.strategy)
    complete = {pid for pid, got in seen.items() if wanted <= got}
    kept = [r for r in rows if r.problem_id in complete and r.strategy in wanted]
    return kept, len(rows) - len(kept)


def _needs_answer(row: Row | None, retry_errors: bool) -> bool:
    return row is None or (retry_errors and row.error is not None)


def _rows_for(wanted: Sequence[tuple[Problem, str]], done: dict[tuple[str, str], Row]) -> list[Row]:
    return [done[(p.id, s)] for p, s in wanted if (p.id, s) in done]
