"""How much KV cache a cloud may hold, how long a session may grow, and how many takeovers
run at once: the memory plan, from what is really there. No torch.

Measured once after the weights are loaded, on the device that holds them:

  free     CUDA: free device memory; CPU: available RAM x `RAM_FRACTION` (the process
           shares the machine)
  reserve  what the largest step allocates besides KV (`step_reserve_bytes`): the
           activations of one prefill chunk, and the logits of the largest decode batch
           with the sampler's copies of them
  KV       CUDA: free x `CUDA_FRACTION` - reserve (the rest is the allocator's slack);
           CPU: free - reserve. `--max-cache-bytes` sets it instead.

The KV budget is never raised above what is there: if one full context of one session
does not fit, the context each session may use is capped to what does (the plan says
so; `--context-length` chooses it). The batch limit (`max_running`) is as many sessions
of `TYPICAL_SESSION_TOKENS` as fit, between 1 and `MAX_RUNNING_CAP`; the paged engine,
which gives every session a slot of one full context, also caps it at its slot count.
`describe()` is the line `serve` prints at start: weights, KV, tokens, sessions, reserve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CUDA_FRACTION = 0.9
RAM_FRACTION = 0.25
TYPICAL_SESSION_TOKENS = 4096
MAX_RUNNING_CAP = 64
MIN_CONTEXT = 256  # a plan that cannot hold this many tokens per session is refused
_GIB = float(1 << 30)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of the model (read from its config by the engine)."""

    bytes_per_token: int  # KV bytes one token of context costs
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    attention_heads: int = 0
    dtype_bytes: int = 4


def step_reserve_bytes(
    shape: ModelShape, *, prefill_chunk: int, max_rows: int, context_length: int, device: str
) -> int:
    """Bytes the largest step allocates besides the KV it keeps: one prefill chunk's
    activations (hidden states, the MLP's three intermediates, q/k/v; on CPU also the
    attention scores, which the math kernel materialises: chunk x heads x context x 4) or
    the decode batch's float32 logits with the sampler's four copies of them, whichever
    is larger, doubled for the allocator's fragmentation."""
    width = 4 * shape.hidden_size + 3 * shape.intermediate_size
    prefill = prefill_chunk * width * shape.dtype_bytes
    if device != "cuda":
        prefill += prefill_chunk * shape.attention_heads * context_length * 4
    logits = max_rows * shape.vocab_size * 4 * 5
    return 2 * max(prefill, logits)


@dataclass(frozen=True)
class MemoryPlan:
    device: str  # "cuda" | "mps" | "cpu"
    free_bytes: int  # what the device had free after the weights (0: unknown)
    bytes_per_token: int  # KV bytes one token of context costs
    context_length: int  # tokens one session may hold (the model's, or capped)
    budget_bytes: int  # KV for all sessions, idle and running
    max_running: int
    budget_source: str  # how budget_bytes was chosen
    running_source: str  # how max_running was chosen
    weights_bytes: int = 0
    reserve_bytes: int = 0  # activations and logits of the largest step
    slots: int = 0  # sessions the paged engine's pool holds (0: not paged)
    context_note: str = ""  # why the context is shorter than the model's, if it is

    @property
    def budget_tokens(self) -> int:
        return self.budget_bytes // max(1, self.bytes_per_token)

    @property
    def sessions(self) -> int:
        """Full-context sessions the KV budget holds (the paged engine: its slots)."""
        if self.slots:
            return self.slots
        return self.budget_tokens // max(1, self.context_length)

    @property
    def planned_bytes(self) -> int:
        """Everything the plan expects on the device: weights + KV + step reserve."""
        return self.weights_bytes + self.budget_bytes + self.reserve_bytes

    def describe(self) -> str:
        context = f"context {self.context_length:,} tokens per session"
        if self.context_note:
            context += f" ({self.context_note})"
        return (
            f"weights {self.weights_bytes / _GIB:.2f} GiB; KV {self.budget_bytes / _GIB:.2f} GiB "
            f"({self.budget_source}) = {self.budget_tokens:,} tokens at "
            f"{self.bytes_per_token / 1024:.1f} KiB = {self.sessions} sessions of {context}; "
            f"step reserve {self.reserve_bytes / _GIB:.2f} GiB; batch limit {self.max_running} "
            f"running takeovers ({self.running_source})"
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
    weights_bytes: int = 0,
    reserve_bytes: int = 0,
    slot_tokens: int = 0,
) -> MemoryPlan:
    """The budget, context and batch limit for this machine (explicit values win).

    `slot_tokens` > 0 plans the paged engine: every session holds a slot of that many
    tokens (its context plus a scratch column), so the budget is a whole number of slots;
    a slot shorter than the context caps the context (the plan says why).
    Raises ValueError when not even `MIN_CONTEXT` tokens of KV fit."""
    bytes_per_token = max(1, bytes_per_token)
    context_note = ""
    if budget_bytes:
        budget, source = budget_bytes, "set by --max-cache-bytes"
    else:
        if device == "cuda":
            share, what = CUDA_FRACTION, "free CUDA memory after the weights"
        else:
            share, what = RAM_FRACTION, f"available {device.upper()} RAM"
        budget = max(0, int(free_bytes * share) - reserve_bytes)
        source = f"{share:.0%} of {free_bytes / _GIB:.1f} GiB {what}, less the step reserve"
        fits = budget // bytes_per_token
        if fits < context_length:
            if fits < MIN_CONTEXT:
                raise ValueError(
                    f"not enough memory for the KV cache: {budget / _GIB:.2f} GiB left after "
                    f"the weights and the step reserve holds {fits} tokens "
                    f"({bytes_per_token / 1024:.1f} KiB each); use a smaller model or dtype"
                )
            context_note = f"capped: {context_length:,} do not fit; --context-length sets it"
            context_length = fits - fits % 256 if fits >= 512 else fits
    slots = 0
    if slot_tokens:
        if slot_tokens < context_length + 1 and not context_note:
            context_note = (
                f"the paged engine's default slot, of the model's {context_length:,}; "
                "--context-length sets it"
            )
        slot_tokens = min(slot_tokens, context_length + 1)
        slots = max(1, budget // (slot_tokens * bytes_per_token))
        context_length = slot_tokens - 1
        budget = slots * slot_tokens * bytes_per_token
    if max_running:
        running, running_source = max_running, "set by --max-running"
    else:
        typical = bytes_per_token * min(context_length, TYPICAL_SESSION_TOKENS)
        running = max(1, min(MAX_RUNNING_CAP, budget // typical))
        running_source = (
            f"sessions of {min(context_length, TYPICAL_SESSION_TOKENS):,} tokens that fit, "
            f"at most {MAX_RUNNING_CAP}"
        )
    if slots and running > slots:
        running, running_source = slots, f"{slots} slots in the paged KV pool"
    return MemoryPlan(
        device=device,
        free_bytes=free_bytes,
        bytes_per_token=bytes_per_token,
        context_length=context_length,
        budget_bytes=budget,
        max_running=running,
        budget_source=source,
        running_source=running_source,
        weights_bytes=weights_bytes,
        reserve_bytes=reserve_bytes,
        slots=slots,
        context_note=context_note,
    )
