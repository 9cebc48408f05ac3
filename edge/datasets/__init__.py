"""The evaluation datasets that ship with the edge (README.md here names sources and licences).

Only locates files: reading and grading them is `edge.evaluate`'s job.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILTIN = ("math500", "aime2024", "math500-l123-s60", "math500-l123-calib")


def resolve(name_or_path: str | Path) -> Path:
    """A built-in dataset's file for its name (e.g. "math500"), else the path as given."""
    name = str(name_or_path)
    if name in BUILTIN:
        return HERE / f"{name}.jsonl"
    return Path(name_or_path)
