"""`PagedEngine` (`serve --engine paged`): the KV cache preallocated as a pool of slots, one
forward per step for every decoding row and every prefill chunk, attention read in place.

Part of `cloud.engine`, the package that alone imports torch and transformers. Planning,
tokenizing, stop rules and the session cache's policy are `EngineBase`'s; what
differs is where KV lives and how a step runs:

  pool      per layer one [slots, kv heads, context + 1, head dim] tensor for keys and one
            for values, allocated once at start from the memory plan (`cloud.memory`: a
            whole number of slots, each one full context). A session keeps its slot while
            idle; the session cache evicts least recently used sessions to free slots.
  rows      decoding runs occupy slots [0, D) (`cloud.slots.SlotTable`): a run that starts
            or stops decoding moves one row (an exchange of two slots' columns), never the
            batch. A decode step reads `pool[:D, :, :L]`, a view.
  a step    ONE forward over a flat sequence: the D decoding rows' pending tokens, then
            chunks of prompts being prefilled (`prefill_step` with `sharing` stages its
            chunk; the `decode_step` that follows runs both, so a step where someone
            prefills reads the weights once). `_SlotAttention` (installed as transformers'
            attention function for the model's implementation, and transparent for any
            other caller) writes each token's K/V into its slot at its position and
            attends: decoding rows in one call over the pool view with grouped query heads
            packed per KV head (no repeat of KV), each prefill chunk causally over its slot.
  sampling  every row that wants a token, in one batched call on the device.

Shapes change only in the batch's row count and the longest row's length, so a step can
be captured per (rows, length bucket) for CUDA graphs; that is not done yet.
Masked columns are read, so they must hold finite values: the table tracks how far each
slot is written and the engine zeroes ahead (256 columns at a time) before reading.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from cloud.batching import StepRun, own
from cloud.engine.base import EngineBase, wants_token
from cloud.engine.kv import as_out_of_memory
from cloud.engine_api import Run, StepEngine
from cloud.session_cache import CachedSession, SessionCaches
from cloud.slots import Exchange, Slot, SlotTable

# Tokens a session's slot holds when --context-length does not say: 32 slots of a 32B
# model on one H200 (2 GiB each), the batch the GPU goals are set for; reasoning traces
# longer than this go on on the edge alone (the cloud answers CONTEXT_FULL).
DEFAULT_SLOT_CONTEXT = 8192


class SlotPool:
    """The preallocated KV tensors and the table of who holds which slot."""

    def __init__(self, cfg: Any, slots: int, columns: int, dtype: torch.dtype, device: Any):
        heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
        kv_heads = int(getattr(cfg, "num_key_value_heads", 0) or heads)
        head_dim = int(getattr(cfg, "head_dim", 0) or cfg.hidden_size // heads)
        layers = int(cfg.num_hidden_layers)
        shape = (layers, slots, kv_heads, columns, head_dim)
        # empty, not zeros: pages are only touched (on CPU: committed) as they are used
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.table = SlotTable(slots, columns)
        self.slot_bytes = 2 * layers * kv_heads * columns * head_dim * dtype.itemsize
        self.exchanges = 0  # rows moved (a run joined or left the decode batch)
        self.moved_columns = 0  # the columns those moves copied

    def allocate(self) -> Slot:
        slot = self.table.allocate()
        self.table.forget(slot.index)
        return slot

    def release(self, slot: Any) -> None:
        if isinstance(slot, Slot):
            self.table.release(slot)

    def carry_out(self, moves: Sequence[Exchange]) -> None:
        """Exchange slots' columns as the table decided (all layers in one copy each)."""
        for m in moves:
            self.exchanges += 1
            self.moved_columns += m.columns
            for t in (self.keys, self.values):
                held = t[:, m.a, :, : m.columns].clone()
                t[:, m.a, :, : m.columns] = t[:, m.b, :, : m.columns]
                t[:, m.b, :, : m.columns] = held

    def zero_to(self, index: int, columns: int) -> None:
        span = self.table.to_zero(index, columns)
        if span is not None:
            self.keys[:, index, :, span[0] : span[1]].zero_()
            self.values[:, index, :, span[0] : span[1]].zero_()


@dataclass
class _Part:
    """A prefill chunk in a step: `tokens` of `run`'s prompt, written from column `start`
    of its session's slot (`slot`, its index when the step runs: rows may move before),
    at offset `offset` of the step's flat sequence."""

    run: StepRun
    start: int
    tokens: list[int]
    slot: int = -1
    offset: int = 0


@dataclass
class _StepLayout:
    """Where each token of one forward's flat sequence goes: D decoding rows first (row i
    is slot i, its token at column `lengths[i]`), then the prefill chunks."""

    pool: SlotPool
    rows: int
    lengths: torch.Tensor | None  # [D] columns the rows' tokens are written at
    mask: torch.Tensor | None  # [D, 1, 1, L]: row i attends to columns <= lengths[i]
    parts: list[_Part] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.mask.shape[-1]) if self.mask is not None else 0

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The step's new K/V ([1, kv heads, tokens, dim]) into the pool, in place."""
        for pool, new in ((self.pool.keys[layer], keys[0]), (self.pool.values[layer], values[0])):
            if self.rows:
                rows = torch.arange(self.rows, device=new.device)
                pool[rows, :, self.lengths] = new[:, : self.rows].transpose(0, 1)
            for p in self.parts:
                n = len(p.tokens)
                pool[p.slot, :, p.start : p.start + n] = new[:, p.offset : p.offset + n]

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention for every token of the step: query [1, heads, tokens, dim] -> [1,
        tokens, heads, dim], as transformers' attention functions return it."""
        _, heads, _, dim = query.shape
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        kv_heads = keys.shape[1]
        out = query.new_empty((1, query.shape[2], heads, dim))
        if self.rows:
            d, width = self.rows, self.width
            # a row's query heads grouped under their KV head: [D, kv heads, group, dim]
            q = query[0, :, :d].transpose(0, 1).reshape(d, kv_heads, heads // kv_heads, dim)
            a = F.scaled_dot_product_attention(
                q, keys[:d, :, :width], values[:d, :, :width], attn_mask=self.mask, scale=scaling
            )
            out[0, :d] = a.reshape(d, heads, dim)
        group = heads // kv_heads
        for p in self.parts:
            n, end = len(p.tokens), p.start + len(p.tokens)
            # packed like the decode rows: each KV head's query heads one after another
            # ([1, kv heads, group x n, dim]), the causal mask repeated per head of the
            # group; no `enable_gqa`, which only the math kernel takes with a mask
            q = query[0, :, p.offset : p.offset + n].reshape(1, kv_heads, group * n, dim)
            causal = torch.ones((n, end), dtype=torch.bool, device=query.device).tril(p.start)
            a = F.scaled_dot_product_attention(
                q,
                keys[p.slot : p.slot + 1, :, :end],
                values[p.slot : p.slot + 1, :, :end],
                attn_mask=causal.repeat(group, 1),
                scale=scaling,
            )
            out[0, p.offset : p.offset + n] = a.reshape(heads, n, dim).transpose(0, 1)
        return out


class _SlotCache:
    """What the model's attention layers call `update` on: the step's K/V go into the
    pool; attention itself reads the pool (`_SlotAttention`)."""

    def __init__(self, layout: _StepLayout) -> None:
        self.layout = layout

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.layout.write(layer_idx, keys, values)
        return keys, values


class _SlotAttention:
    """Wraps transformers' attention function for one implementation name: a call that
    carries `slot_step` (this engine's forwards) attends through the pool, any other call
    goes to the wrapped function unchanged (the row engine may share the model)."""

    def __init__(self, wrapped: Callable[..., Any]) -> None:
        self.wrapped = wrapped

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):  # type: ignore[no-untyped-def]
        layout = kwargs.get("slot_step")
        if layout is None:
            return self.wrapped(module, query, key, value, attention_mask, *args, **kwargs)
        return layout.attend(module.layer_idx, query, kwargs.get("scaling")), None


def install_attention(model: Any) -> None:
    """Route the model's attention through `_SlotAttention` (once per process and name)."""
    cfg = model.config
    name = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if name == "eager":  # eager attention is not looked up by name: use SDPA
        model.set_attn_implementation("sdpa")
        name = "sdpa"
    current = AttentionInterface._global_mapping.get(name)
    if current is None:
        raise ValueError(f"the paged engine cannot wrap attention implementation {name!r}")
    if not isinstance(current, _SlotAttention):
        AttentionInterface.register(name, _SlotAttention(current))  # type: ignore[arg-type]


class PagedEngine(EngineBase):
    """`cloud.engine_api.StepEngine`, paged path (see the module doc). Build it with `load()`."""

    kind = "paged"

    def _slot_tokens(self, context: int, chosen: bool) -> int:
        """One context per slot, plus a scratch column. Unless --context-length chose it,
        at most `DEFAULT_SLOT_CONTEXT` tokens: a slot of a 32B model's whole 131,072-token
        context is 32 GiB, and an H200 would hold two of them."""
        return (context if chosen else min(context, DEFAULT_SLOT_CONTEXT)) + 1

    def _session_caches(self, ttl_s: float, clock: Callable[[], float]) -> SessionCaches:
        self.pool = SlotPool(
            self.config,
            self.memory.slots,
            self.memory.context_length + 1,
            self.model.dtype,
            self.device,
        )
        self._staged: list[_Part] = []
        # a 4D attention mask makes transformers build none (this engine's attention masks)
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        install_attention(self.model)
        size = self.pool.slot_bytes
        return SessionCaches(
            budget_bytes=self.memory.budget_bytes,
            ttl_s=ttl_s,
            new_cache=self.pool.allocate,
            nbytes=lambda slot: size,
            crop=lambda slot, n: None,  # a session's length is its ids; columns past it are dead
            bytes_per_token=self.memory.bytes_per_token,
            clock=clock,
            running_bytes=self._running_bytes,
            release=self.pool.release,
        )

    def _running_bytes(self, running: list[CachedSession]) -> int:
        return len(running) * self.pool.slot_bytes

    # ---- steps -------------------------------------------------------------------------

    def prefill_step(self, runs: Sequence[Run], sharing: bool) -> None:
        """Chunks of the prefilling runs' prompts, oldest first, up to the step's budget;
        with `sharing` they are staged for the `decode_step` that follows (one forward)."""
        mine = [
            r for r in map(own, runs) if r.prefilling and all(p.run is not r for p in self._staged)
        ]
        budget = self.sharing_chunk if sharing else self.prefill_chunk
        budget -= sum(len(p.tokens) for p in self._staged)
        for run in mine:
            if budget <= 0:
                break
            s = run.s
            assert s is not None and isinstance(s.cache, Slot)
            chunk = run.prompt[len(s.ids) :][:budget]
            self._staged.append(_Part(run, len(s.ids), chunk))
            budget -= len(chunk)
        if not sharing:
            self._step([])

    def decode_step(self, runs: Sequence[Run]) -> None:
        """A token for every run, and the staged prefill chunks, in one forward."""
        self._step([own(r) for r in runs])

    def finish(self, runs: Sequence[Run]) -> None:
        mine = [own(r) for r in runs]
        self._staged = [p for p in self._staged if p.run not in mine]
        for run in mine:
            if run.s is not None and isinstance(run.s.cache, Slot):
                self.pool.carry_out(self.pool.table.leave(run.s.cache))
            if run.s is not None:
                run.t2 = time.perf_counter()
                self.caches.checkin(run.session, run.s)

    def _settle(self, decoding: Sequence[StepRun]) -> list[StepRun]:
        """Make slots [0, D) exactly the decoding runs'; returns them in slot order."""
        table = self.pool.table
        mine = {id(r.s.cache) for r in decoding if r.s is not None}
        for index in range(table.decoding - 1, -1, -1):
            owner = table.owners[index]
            if owner is not None and id(owner) not in mine:
                self.pool.carry_out(table.leave(owner))
        for run in decoding:
            assert run.s is not None and isinstance(run.s.cache, Slot)
            self.pool.carry_out(table.join(run.s.cache))
        return sorted(decoding, key=lambda r: r.s.cache.index)  # type: ignore[union-attr]

    def _step(self, decoding: list[StepRun]) -> None:
        parts, self._staged = self._staged, []
        if not decoding and not parts:
            return
        started = time.perf_counter()
        with torch.inference_mode():
            rows = self._settle(decoding)
            ids: list[int] = [r.pending for r in rows]  # type: ignore[misc]
            positions = [len(r.s.ids) for r in rows]  # type: ignore[union-attr]
            layout = _StepLayout(self.pool, len(rows), None, None, parts)
            if rows:
                width = max(positions) + 1
                for i in range(len(rows)):
                    self.pool.zero_to(i, width)
                layout.lengths = torch.tensor(positions, device=self.device)
                columns = torch.arange(width, device=self.device)
                layout.mask = (columns.unsqueeze(0) <= layout.lengths.unsqueeze(1)).view(
                    len(rows), 1, 1, width
                )
            for p in parts:
                assert p.run.s is not None and isinstance(p.run.s.cache, Slot)
                p.slot, p.offset = p.run.s.cache.index, len(ids)
                ids.extend(p.tokens)
                positions.extend(range(p.start, p.start + len(p.tokens)))
            # each row's logits, and each part's last (a judged prefill's: from its probe on)
            keep = list(range(len(rows)))
            spans: list[tuple[int, int]] = []  # per part: where its logits start, how many
            for p in parts:
                n = len(p.tokens)
                k = self._scored(p.run, p.start, n)
                spans.append((len(keep), k))
                keep.extend(range(p.offset + n - k, p.offset + n))
            try:
                out = self.model(
                    input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                    position_ids=torch.tensor([positions], device=self.device),
                    attention_mask=self._no_mask,
                    use_cache=True,
                    logits_to_keep=torch.tensor(keep, device=self.device),
                    slot_step=layout,
                    **{self._cache_kw: _SlotCache(layout)},
                )
            except BaseException as exc:  # nothing was committed: every run is as before
                oom = as_out_of_memory(exc, self.device)
                if oom is not None:
                    raise oom from exc
                raise
            logits = out.logits[0]
            # commit: the tokens whose KV is now in the pool
            table = self.pool.table
            for i, run in enumerate(rows):
                assert run.s is not None and run.pending is not None
                run.s.ids.append(run.pending)
                table.mark_written(i, len(run.s.ids))
            for p in parts:
                assert p.run.s is not None
                p.run.s.ids.extend(p.tokens)
                table.mark_written(p.slot, p.start + len(p.tokens))
            if not rows:
                self._measure_prefill(len(ids), time.perf_counter() - started)
            # sample: every decoding row, and each prompt that is now complete
            wanting = list(zip(rows, range(len(rows)), strict=True))
            for p, (at, k) in zip(parts, spans, strict=True):
                run = p.run
                self._score(run, p.start + len(p.tokens), logits[at : at + k])
                if not run.prefilling:
                    run.t1 = time.perf_counter()
                    if wants_token(run):
                        wanting.append((run, at + k - 1))
            if wanting:
                picked = logits[torch.tensor([i for _, i in wanting], device=logits.device)]
                tokens = self._pick_rows([r for r, _ in wanting], picked)
                for (run, _), token in zip(wanting, tokens, strict=True):
                    self._advance(run, token)


def _implements_engine(engine: PagedEngine) -> StepEngine:
    return engine  # mypy checks PagedEngine against the StepEngine protocol here
