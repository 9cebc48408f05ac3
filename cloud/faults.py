"""TEST ONLY: make the engine's steps fail or hang on demand, to test health in a real process.

`specthink-cloud serve` reads `SPECTHINK_FAULT_INJECT=FLAG_FILE` at start; unset (as in
production) nothing is wrapped and this module does nothing. When set, it says so on
stderr, and every prefill or decode step, while FLAG_FILE exists, does what its first
word says:

  raise   raises RuntimeError("injected fault ...")            (a repeating step error)
  cuda    raises RuntimeError("CUDA error: an illegal memory access was encountered ...")
                                                              (a sticky device error)
  hang    blocks until FLAG_FILE is removed                    (a hung kernel)

Removing the file heals the engine, so a test can show a recovery too. Nothing else of
the engine changes: it is wrapped, not modified.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ENV = "SPECTHINK_FAULT_INJECT"
KINDS = ("raise", "cuda", "hang")  # the flag file's first word (empty: raise)


class FaultyEngine:
    """A StepEngine whose prefill and decode steps fail while `flag` exists."""

    def __init__(self, engine: Any, flag: Path) -> None:
        self._engine = engine
        self.flag = flag

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _kind(self) -> str | None:
        try:
            words = self.flag.read_text().split()
        except OSError:  # no flag: no fault
            return None
        return words[0] if words else "raise"

    def _fault(self) -> None:
        kind = self._kind()
        if kind is None:
            return
        if kind == "cuda":
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered ({ENV})")
        if kind == "hang":
            while self.flag.exists():
                time.sleep(0.05)
            return
        raise RuntimeError(f"injected fault ({ENV})")

    def prefill_step(self, runs: Sequence[Any], sharing: bool) -> Any:
        self._fault()
        return self._engine.prefill_step(runs, sharing=sharing)

    def decode_step(self, runs: Sequence[Any]) -> Any:
        self._fault()
        return self._engine.decode_step(runs)


def from_env(engine: Any, environ: Mapping[str, str] | None = None) -> Any:
    """`engine` wrapped as `SPECTHINK_FAULT_INJECT` says, or `engine` itself when unset."""
    flag = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not flag:
        return engine
    if not Path(flag).parent.is_dir():
        raise ValueError(f"{ENV}={flag}: the flag file's folder does not exist")
    return FaultyEngine(engine, Path(flag))
