"""How much KV cache a cloud may hold, and how many takeovers it runs at once. No torch.

The default budget comes from the machine, measured once after the weights are loaded:

  CUDA  free device memory x `CUDA_FRACTION` (the rest is headroom for activations,
        logits and the allocator)
  CPU   available RAM x `RAM_FRACTION` (the process shares the machine)

and is never smaller than one full context window of one session, so any one takeover
the model accepts can run. The batch-size limit (`max_running`) follows from it: as
many sessions of `TYPICAL_SESSION_TOKENS` as fit, between 1 and `MAX_RUNNING_CAP`.
Either may be given explicitly instead. `describe()` is the line `serve` prints at start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CUDA_FRACTION = 0.8
RAM_FRACTION = 0.25
TYPICAL_SESSION_TOKENS = 4096
MAX_RUNNING_CAP = 64
_GIB = float(1 << 30)


@dataclass(frozen=True)
class MemoryPlan:
    device: str  # "cuda" | "mps" | "cpu"
    free_bytes: int  # what the device had free after the weights (0: unknown)
    bytes_per_token: int  # KV bytes one token of context costs
    context_length: int
    budget_bytes: int
    max_running: int
    budget_source: str  # how budget_bytes was chosen
    running_source: str  # how max_running was chosen

    @property
    def budget_tokens(self) -> int:
        return self.budget_bytes // max(1, self.bytes_per_token)

    def describe(self) -> str:
        return (
            f"KV cache budget {self.budget_bytes / _GIB:.2f} GiB ({self.budget_source}), "
            f"{self.bytes_per_token / 1024:.1f} KiB per token = {self.budget_tokens:,} tokens "
            f"= {self.budget_tokens / max(1, self.context_length):.1f} full contexts of "
            f"{self.context_length:,}; batch limit {self.max_running} running takeovers "
            f"({self.running_source})"
        )


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (page cache counts as free), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def plan(
    *,
    device: str,
    free_bytes: int,
    bytes_per_token: int,
    context_length: int,
    budget_bytes: int | None = None,
    max_running: int | None = None,
) -> MemoryPlan:
    """The budget and batch limit for this machine (explicit values win when given)."""
    bytes_per_token = max(1, bytes_per_token)
    one_context = bytes_per_token * context_length
    if budget_bytes:
        budget, source = budget_bytes, "set by --max-cache-bytes"
    else:
        if device == "cuda":
            share, what = CUDA_FRACTION, "free CUDA memory after the weights"
        else:
            share, what = RAM_FRACTION, f"available {device.upper()} RAM"
        budget = int(free_bytes * share)
        source = f"{share:.0%} of {free_bytes / _GIB:.1f} GiB {what}"
        if budget < one_context:
            budget, source = one_context, source + ", raised to one full context"
    if max_running:
        running, running_source = max_running, "set by --max-running"
    else:
        typical = bytes_per_token * min(context_length, TYPICAL_SESSION_TOKENS)
        running = max(1, min(MAX_RUNNING_CAP, budget // typical))
        running_source = (
            f"sessions of {min(context_length, TYPICAL_SESSION_TOKENS):,} tokens that fit, "
            f"at most {MAX_RUNNING_CAP}"
        )
    return MemoryPlan(
        device=device,
        free_bytes=free_bytes,
        bytes_per_token=bytes_per_token,
        context_length=context_length,
        budget_bytes=budget,
        max_running=running,
        budget_source=source,
        running_source=running_source,
    )
