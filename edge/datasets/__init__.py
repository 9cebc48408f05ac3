"""The evaluation datasets: those that ship with the edge (README.md here names sources and
licences) located by name, any JSON Lines file of problems read into `Problem` records, and
the paper's math prompt. Grading is edge/grading.py; the results file edge/eval_results.py;
the run edge/evaluate.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILTIN = (
    "math500",
    "aime2024",
    "math500-l123-s60",
    "math500-l123-s60b",
    "math500-l123-calib",
)


def resolve(name_or_path: str | Path) -> Path:
    """A built-in dataset's file for its name (e.g. "math500"), else the path as given."""
    name = str(name_or_path)
    if name in BUILTIN:
        return HERE / f"{name}.jsonl"
    return Path(name_or_path)


PROMPT_TEMPLATE = (
    "Please reason step by step, and put your final answer within \\boxed{{}}. {problem}"
)


class EvalError(Exception):
    """A problem with the evaluation's inputs or results file, stated for a person."""


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
