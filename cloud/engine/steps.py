"""`TransformersEngine` (`serve --engine rows`): per-session KV caches that grow as
`DynamicCache`s, batched across calls as the left-padded rows of one cache
(`cloud.batching`); a prefill forward and a decode forward per step (the order is in
`cloud.engine`'s docstring).

Part of `cloud.engine`, the package that alone imports torch and transformers. What both
paths share is `cloud.engine.base.EngineBase`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from cloud.batching import DecodeBatch, StepRun, own
from cloud.engine.base import EngineBase, wants_token
from cloud.engine.kv import as_out_of_memory, cache_bytes, cache_of, crop
from cloud.engine_api import Run, StepEngine
from cloud.session_cache import CachedSession, SessionCaches


class TransformersEngine(EngineBase):
    """`cloud.engine_api.StepEngine` on torch + transformers, rows path. Build it with `load()`."""

    kind = "rows"

    def __init__(self, model: Any, tokenizer: Any, **options: Any) -> None:
        self._batch = DecodeBatch(cache_of)  # the decoding runs
        self._rows = DecodeBatch(cache_of)  # runs prefilled together, for one step
        super().__init__(model, tokenizer, **options)

    # ---- what a session keeps: its own growing cache -----------------------------------

    def _slot_tokens(self, context: int, chosen: bool) -> int:
        """Tokens per preallocated slot (0: none; sessions hold caches that grow)."""
        return 0

    def _session_caches(self, ttl_s: float, clock: Callable[[], float]) -> SessionCaches:
        return SessionCaches(
            budget_bytes=self.memory.budget_bytes,
            ttl_s=ttl_s,
            new_cache=DynamicCache,
            nbytes=cache_bytes,
            crop=crop,
            bytes_per_token=self.memory.bytes_per_token,
            clock=clock,
            running_bytes=self._running_bytes,
        )

    def _running_bytes(self, running: list[CachedSession]) -> int:
        """What running sessions really hold: their own caches, and the decode batch (left-
        padded to its longest row) twice, since a join builds the new batch beside the old."""
        held = {id(s.cache): cache_bytes(s.cache) for s in running}
        batch = self._batch.cache
        if batch is not None and id(batch) not in held:
            held[id(batch)] = cache_bytes(batch)
        return sum(held.values()) + (cache_bytes(batch) if batch is not None else 0)

    # ---- the phases (the engine thread) -----------------------------------------------

    def prefill_step(self, runs: Sequence[Run], sharing: bool) -> None:
        """One chunk of the first run's prompt, and chunks of the same length for as many
        of the others as fit the step's budget (rows x chunk tokens), in one forward.
        A run whose prompt is done samples its first token."""
        mine = [r for r in map(own, runs) if r.prefilling]
        if not mine:
            return
        budget = self.sharing_chunk if sharing else self.prefill_chunk
        width = min(mine[0].remaining, budget)
        group = mine[: max(1, budget // width)]
        # a judged prefill keeps the logits of many positions: it runs alone
        group = (
            group[:1]
            if group[0].score_from is not None
            else [r for r in group if r.score_from is None]
        )
        started = time.perf_counter()
        with torch.inference_mode():
            try:
                if len(group) == 1:
                    run = group[0]
                    s, start = run.s, len(run.s.ids)  # type: ignore[union-attr]
                    chunk = run.prompt[start : start + width]
                    kept = self._forward(s, chunk, self._scored(run, start, len(chunk)))  # type: ignore[arg-type]
                    self._score(run, start + len(chunk), kept)
                    logits = [kept[-1]]
                else:
                    logits = self._forward_rows(group, width)
            except BaseException as exc:
                for run in group:  # layers a failed forward reached have grown: cut back
                    if run.s is not None and not run.in_batch:
                        crop(run.s.cache, len(run.s.ids))
                oom = as_out_of_memory(exc, self.device)
                if oom is not None:
                    raise oom from exc
                raise
            self._measure_prefill(len(group) * width, time.perf_counter() - started)
            ready = [i for i, run in enumerate(group) if not run.prefilling]
            for i in ready:
                group[i].t1 = time.perf_counter()
            wanting = [i for i in ready if wants_token(group[i])]
            if wanting:
                rows = torch.stack([logits[i] for i in wanting])
                tokens = self._pick_rows([group[i] for i in wanting], rows)
                for i, token in zip(wanting, tokens, strict=True):
                    self._advance(group[i], token)

    def decode_step(self, runs: Sequence[Run]) -> None:
        """One token for every run: their pending tokens through the model as one batch."""
        with torch.inference_mode():
            batch = self._batch
            batch.settle([own(r) for r in runs])
            before = batch.length
            try:
                logits = self._forward_batch(batch)
            except BaseException as exc:
                batch.recover(before)  # every row back to its last completed step
                oom = as_out_of_memory(exc, self.device)
                if oom is not None:
                    raise oom from exc
                raise
            tokens = self._pick_rows(batch.runs, logits)
            for run, token in zip(batch.runs, tokens, strict=True):
                assert run.s is not None and run.pending is not None
                run.s.ids.append(run.pending)  # its KV is computed now
                self._advance(run, token)

    def finish(self, runs: Sequence[Run]) -> None:
        """Check the runs' caches back in; batch rows are given back first, together."""
        mine = [own(r) for r in runs]
        self._batch.release([r for r in mine if r.in_batch])
        for run in mine:
            if run.s is not None:
                run.t2 = time.perf_counter()
                self.caches.checkin(run.session, run.s)

    def _forward(self, s: CachedSession, ids: Sequence[int], keep: int = 1) -> torch.Tensor:
        """Run `ids` after the session's cached tokens; returns the logits of the last
        `keep` positions ([keep, vocab])."""
        start = len(s.ids)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        kwargs: dict[str, Any] = {self._cache_kw: s.cache}
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **kwargs,
        )
        s.ids.extend(ids)  # only once the forward has completed
        return out.logits[0]

    def _forward_rows(self, runs: Sequence[StepRun], width: int) -> list[torch.Tensor]:
        """Up to `width` prompt tokens of each run in one forward: their caches as the
        left-padded rows of a batch (`_rows`), their chunks left-aligned after it, shorter
        chunks padded on the right (masked, and cut from the cache afterwards). Returns
        each run's logits at its chunk's last token."""
        rows = self._rows
        rows.settle(runs)
        before = rows.length
        chunks = [r.prompt[len(r.s.ids) :][:width] for r in runs if r.s is not None]
        n = max(map(len, chunks))
        ids = [c + [c[-1]] * (n - len(c)) for c in chunks]
        starts = [len(r.s.ids) for r in runs if r.s is not None]
        columns = torch.arange(before + n, device=self.device).unsqueeze(0)
        pads = torch.tensor(rows.pads, device=self.device).unsqueeze(1)
        ends = torch.tensor([before + len(c) for c in chunks], device=self.device).unsqueeze(1)
        last = sorted({len(c) - 1 for c in chunks})
        kwargs: dict[str, Any] = {self._cache_kw: rows.cache}
        try:
            out = self.model(
                input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
                position_ids=torch.tensor(
                    [[s + i for i in range(n)] for s in starts], device=self.device
                ),
                attention_mask=((columns >= pads) & (columns < ends)).long(),
                use_cache=True,
                logits_to_keep=torch.tensor(last, device=self.device),
                **kwargs,
            )
        except BaseException:
            rows.recover(before)
            raise
        for r, c in zip(runs, chunks, strict=True):
            assert r.s is not None
            r.s.ids.extend(c)
        rows.release(list(rows.runs))
        for r in runs:
            assert r.s is not None
            crop(r.s.cache, len(r.s.ids))  # the padding tokens' KV at the end of short rows
        return [out.logits[i, last.index(len(c) - 1)] for i, c in enumerate(chunks)]

    def _forward_batch(self, batch: DecodeBatch) -> torch.Tensor:
        """Each row's pending token at its own position; rows are left-padded to one
        length, and the padding is masked. Returns [rows, vocab] logits."""
        runs = batch.runs
        input_ids = torch.tensor([[r.pending] for r in runs], dtype=torch.long, device=self.device)
        positions = torch.tensor(
            [[len(r.s.ids)] for r in runs if r.s is not None], dtype=torch.long, device=self.device
        )
        kwargs: dict[str, Any] = {self._cache_kw: batch.cache}
        if any(batch.pads):
            pads = torch.tensor(batch.pads, device=self.device).unsqueeze(1)
            columns = torch.arange(batch.length + 1, device=self.device).unsqueeze(0)
            kwargs["attention_mask"] = (columns >= pads).long()
        out = self.model(
            input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs
        )
        return out.logits[:, -1]


def _implements_engine(engine: TransformersEngine) -> StepEngine:
    return engine  # mypy checks TransformersEngine against the StepEngine protocol here
