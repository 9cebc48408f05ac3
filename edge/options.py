"""What one edge command was asked to do, typed, parsed once: `EdgeOptions`.

The flags are declared once (edge/flags.py) and land here; `ask`, `chat` and `eval` each get
one `EdgeOptions` and hand it to `edge.run.build_run` (or the eval's runner). The settings
layered under the flags (environment, config file, defaults: edge/config.py) are resolved
from the fields that name a setting. Imports nothing heavy and nothing else of the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Strategy(StrEnum):
    """Who writes the answer."""

    SPECULATIVE = "speculative"  # the small model writes, the large one takes over (the method)
    EDGE = "edge"  # the small model alone (a baseline)
    CLOUD = "cloud"  # the large model alone (a baseline)


class Mark(StrEnum):
    """How the cloud's text is marked in streamed output."""

    AUTO = "auto"  # colour on a terminal without NO_COLOR, else brackets
    COLOR = "color"
    BRACKETS = "brackets"
    NONE = "none"


def choices(kind: type[StrEnum]) -> str:
    """'a, b or c': the values of an enum for a message."""
    values = [str(v) for v in kind]
    return ", ".join(values[:-1]) + " or " + values[-1]


@dataclass(frozen=True)
class EdgeOptions:
    """Every flag of ask / chat / eval. `None` means "not given on the command line": the
    environment, the config file or the default decides (edge/config.py)."""

    # settings (flag > SPECTHINK_* > config file > default)
    model: str | None = None
    cloud: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    mode: str | None = None
    strategy: str | None = None
    policy_file: Path | None = None
    gpu_layers: int | None = None
    threads: int | None = None
    # how to run and show the answer
    knobs: tuple[str, ...] = ()  # --set KEY=VALUE, in order
    local_only: bool = False
    system: str | None = None
    json_out: bool = False
    jsonl: bool = False
    hide_thinking: bool = False
    verbose: bool = False
    mark: Mark = Mark.AUTO
    prefill_every: int = 0
