"""What the session loop produces: the answer, its segments (who wrote what, and why), its
stats, the events it reports as it goes, and the refusal that carries the answer so far.

Plain data only: it imports nothing of the edge and knows no model, no transport and no
rendering (edge/session.py fills these in, edge/render.py prints them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from shared import errors


@dataclass
class Segment:
    source: str  # "edge" | "cloud"
    text: str
    tokens: int
    reason: str


@dataclass
class Stats:
    """What an answer cost and who wrote it; README.md's `--json` table documents each field.
    Every count follows the text: `takeovers` is the number of cloud segments in `segments`,
    the token counts are their sums."""

    edge_tokens: int = 0
    cloud_tokens: int = 0
    takeovers: int = 0  # cloud segments in the answer (hand-overs where the cloud wrote)
    wall_s: float = 0.0
    ttft_s: float = 0.0
    fallback: bool = False
    cloud_cached_tokens: int = 0
    cloud_prefill_tokens: int = 0
    # beyond the contract
    takeover_attempts: int = 0  # hand-overs decided, whether or not the cloud wrote
    fallbacks: int = 0  # hand-overs where the cloud failed and the edge wrote instead
    cloud_full: bool = False  # the text outgrew the cloud; the edge wrote the rest alone
    cloud_calls: int = 0
    full_text_resends: int = 0
    cloud_prefills: int = 0
    cloud_prefills_abandoned: int = 0
    probe_tokens_discarded: int = 0
    judge_calls: int = 0  # probes sent to the cloud's judge (cloud-judge trigger)
    judge_accepts: int = 0  # of those, kept by the cloud
    judge_wait_s: float = 0.0  # the edge's wait for the verdicts (the judge's cost on the edge)
    judge_prefill_s: float = 0.0  # the cloud's prefill of text and probe (its cost there)
    cloud_wait_s: float = 0.0
    edge_draft_s: float = 0.0
    cloud_first_chunk_s: list[float] = field(default_factory=list)


@dataclass
class Answer:
    text: str
    finish_reason: str
    segments: list[Segment]
    stats: Stats
    notices: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        stats = asdict(self.stats)
        stats["wall_s"] = round(stats["wall_s"], 4)
        stats["ttft_s"] = round(stats["ttft_s"], 4)
        stats["cloud_wait_s"] = round(stats["cloud_wait_s"], 4)
        stats["edge_draft_s"] = round(stats["edge_draft_s"], 4)
        stats["judge_wait_s"] = round(stats["judge_wait_s"], 4)
        stats["judge_prefill_s"] = round(stats["judge_prefill_s"], 4)
        stats["cloud_first_chunk_s"] = [round(x, 4) for x in stats["cloud_first_chunk_s"]]
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "segments": [asdict(s) for s in self.segments],
            "stats": stats,
            "notices": self.notices,
        }


@dataclass(frozen=True)
class Event:
    """What the loop reports as it goes (the CLI renders these; --jsonl prints them)."""

    kind: str  # "segment" | "text" | "takeover" | "fallback" | "done"
    data: dict[str, Any]


EventSink = Callable[[Event], None]


class CloudRefused(Exception):
    """The cloud refused for a reason retrying cannot fix (auth, invalid request).
    The answer written so far rides along so that nothing is lost."""

    def __init__(self, error: errors.SpecThinkError, answer: Answer) -> None:
        super().__init__(error.message)
        self.error = error
        self.answer = answer
