"""The evaluation's run: every (problem, strategy) pair answered through an ``AnswerFn``,
graded, and appended to the results file as it is finished, with a progress line. Knows
nothing about models or gRPC (edge/eval_command.py plugs them in).

The stages live apart: ``edge.datasets`` (problems, the paper's math prompt),
``edge.grading`` (math-verify), ``edge.eval_results`` (rows and the resumable results
file), ``edge.eval_report`` (the table, report.json and the plot).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from edge.datasets import Problem, math_prompt
from edge.eval_results import (
    PAIR_KEYS,
    Row,
    append_line,
    error_row,
    open_results,
    row_from_result,
)

AnswerFn = Callable[[str, str], dict]
"""``answer_fn(prompt_text, strategy) -> edge result object``; may raise for a failed problem."""


class EvalInterrupted(KeyboardInterrupt):
    """Raised by ``run_eval`` on Ctrl-C after the results file is closed.

    Still a ``KeyboardInterrupt`` (so an unprepared caller stops as usual); ``rows`` holds
    every finished row of this run's problems for every strategy of the table, including
    those from earlier runs.
    """

    def __init__(self, rows: list[Row]) -> None:
        super().__init__(f"interrupted after {len(rows)} finished rows")
        self.rows = rows


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
    f, existing, stored = open_results(Path(out_path), config, restart, allow_mixed)
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
            append_line(f, row.to_json())
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
