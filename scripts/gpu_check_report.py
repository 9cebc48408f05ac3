"""The device check's report, and nothing it measures: rows printed as they come, the run's
state (results per section, what was skipped or failed), the time budget and its watchdog,
and DIR/gpu_check.json rewritten after every section."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_GIB = float(1 << 30)
WATCHDOG_GRACE_S = 25.0


@dataclass
class Row:
    section: str
    figure: str
    value: str
    goal: str = ""
    status: str = "info"  # MET | NOT MET | info | SKIPPED | ERROR | n/a


class Check:
    """The run's state: rows, results per section, the budget, and the JSON file."""

    def __init__(self, out: Path, budget_s: float, meta: dict[str, Any]) -> None:
        self.out = out
        self.budget_s = budget_s
        self.t0 = time.monotonic()
        self.meta = meta
        self.rows: list[Row] = []
        self.results: dict[str, Any] = {}
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.complete = False
        self._lock = threading.Lock()
        out.mkdir(parents=True, exist_ok=True)
        print(f"{'section':<16} {'figure':<58} {'value':<52} {'goal':<22} status", flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def left(self) -> float:
        return self.budget_s - self.elapsed

    def row(
        self, section: str, figure: str, value: str, goal: str = "", met: bool | None = None
    ) -> None:
        status = "info" if met is None else ("MET" if met else "NOT MET")
        self.add(Row(section, figure, value, goal, status))

    def add(self, r: Row) -> None:
        with self._lock:
            self.rows.append(r)
        print(f"{r.section:<16} {r.figure:<58} {r.value:<52} {r.goal:<22} {r.status}", flush=True)

    def note(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def section(
        self, name: str, needs_s: float, body: Callable[[], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """Run `body` if at least `needs_s` of the budget is left; record its result, or why
        it was skipped or failed; rewrite the JSON either way."""
        if self.left < needs_s:
            why = f"{self.left:.0f} s of the budget left, needs ~{needs_s:.0f} s"
            self.skipped.append(f"{name}: {why}")
            self.add(Row(name, "(section skipped)", why, "", "SKIPPED"))
            self.save()
            return None
        started = time.monotonic()
        try:
            result = body()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            self.errors.append(f"{name}: {text}\n{traceback.format_exc()}")
            self.add(Row(name, "(section failed)", text[:200], "", "ERROR"))
            result = {"error": text}
        if result is not None:
            result["section_s"] = round(time.monotonic() - started, 2)
            self.results[name] = result
        self.save()
        return result

    def document(self) -> dict[str, Any]:
        goals = [asdict(r) for r in self.rows if r.status in ("MET", "NOT MET")]
        return {
            "meta": self.meta,
            "budget_s": self.budget_s,
            "elapsed_s": round(self.elapsed, 2),
            "complete": self.complete,
            "rows": [asdict(r) for r in self.rows],
            "goals": {
                "met": sum(r["status"] == "MET" for r in goals),
                "not_met": sum(r["status"] == "NOT MET" for r in goals),
            },
            "sections": self.results,
            "skipped": self.skipped,
            "errors": self.errors,
        }

    def save(self) -> None:
        with self._lock:
            text = json.dumps(clean(self.document()), indent=1, default=str, allow_nan=False)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(text)
        tmp.replace(self.out / "gpu_check.json")


def clean(x: Any) -> Any:
    """JSON has no NaN or infinity: such numbers are written as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def gib(n: float) -> str:
    return f"{n / _GIB:.2f} GiB"


def start_watchdog(check: Check, after_s: float) -> None:
    """End the process `after_s` from the start, JSON written, if it is still running."""

    def fire() -> None:
        check.errors.append(f"watchdog: still running {after_s:.0f} s after the start")
        with contextlib.suppress(Exception):
            check.save()
        print(f"gpu_check: the watchdog ended the run at {after_s:.0f} s", flush=True)
        os._exit(3)

    timer = threading.Timer(max(1.0, after_s - check.elapsed), fire)
    timer.daemon = True
    timer.start()
