"""Calls in progress and the decode batch: which KV rows belong to which call.

No torch import: `cloud.engine` owns torch and runs the forwards; this module only moves
KV tensors between a call's own cache and the batch, through the tensors' own methods
(slicing, `new_zeros`, `clone`) and a cache factory the engine passes in.

The batch holds the KV of every call decoding now as the rows of ONE cache, each row
right-aligned (left-padded) to the longest. Row i's tokens sit in columns pads[i]..L-1;
the engine masks the padding and gives each row its own position ids, so each row
attends to exactly its own tokens. Between steps rows join (padded copies) and leave
(their columns copied back out, the rest compacted). A call alone in the batch keeps its
own cache object, unpadded: one call by itself decodes exactly as it did unbatched. While
batched, a row's KV lives in the batch only (its own cache is emptied at the join).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cloud.decoding import TextOutput
from cloud.engine_api import Generated, Prefilled, Run, ShouldStop
from cloud.session_cache import CachedSession
from shared.wire import Sampling, TextChunk, Usage

# [batch, heads, tokens, dim] key and value tensors, one pair per layer -> a cache object
CacheFactory = Callable[[Iterable[tuple[Any, Any]]], Any]


class StepRun:
    """One generate or prefill call in progress (`cloud.engine_api.Run`)."""

    def __init__(
        self,
        session: str,
        prompt: list[int],
        should_stop: ShouldStop,
        output: TextOutput | None,
        sampling: Sampling,
        seed: int,
    ) -> None:
        self.session = session
        self.prompt = prompt
        self.should_stop = should_stop
        self.output = output  # None: a prefill call
        self.sampling = sampling
        self.seed = seed  # the request's seed, or one drawn for it (`cloud.engine.sampling`)
        self.draws = 0  # tokens sampled so far: the sampler's counter for this seed
        self.s: CachedSession | None = None  # the session's cache, once started
        self.cached = 0  # prompt tokens re-used from the session
        self.pending: int | None = None  # sampled, KV not computed yet
        self.in_batch = False  # its KV is a row of the batch, not in s.cache
        self.t0 = self.t1 = self.t2 = 0.0  # started, prefilled, finished (perf_counter)
        # a judged prefill: prompt tokens from this index on are the probe, whose
        # log-probabilities (`logprobs`) the prefill collects
        self.score_from: int | None = None
        self.logprobs: list[float] = []

    @property
    def prefilling(self) -> bool:
        return self.s is not None and len(self.s.ids) < len(self.prompt)

    @property
    def remaining(self) -> int:
        """Prompt tokens still to prefill."""
        return len(self.prompt) - len(self.s.ids) if self.s is not None else len(self.prompt)

    @property
    def done(self) -> bool:
        if self.s is None or self.prefilling:
            return False
        return self.output is None or self.output.finish is not None

    def take(self) -> list[TextChunk]:
        return self.output.take() if self.output is not None else []

    def outcome(self) -> Generated | Prefilled:
        prompt = len(self.prompt)
        if self.output is None:
            usage = Usage(prompt, self.cached, prompt - self.cached, 0)
            return Prefilled(usage, self.t1 - self.t0, tuple(self.logprobs))
        assert self.output.finish is not None
        usage = Usage(prompt, self.cached, prompt - self.cached, self.output.generated)
        return Generated(
            self.output.finish,
            usage,
            prefill_s=self.t1 - self.t0,
            decode_s=max(0.0, (self.t2 or time.perf_counter()) - self.t1),
            text=self.output.text,
        )


def own(run: Run) -> StepRun:
    assert isinstance(run, StepRun), f"not a run of this engine: {run!r}"
    return run


class DecodeBatch:
    """The rows of the calls decoding together (see the module doc)."""

    def __init__(self, make_cache: CacheFactory) -> None:
        self.make_cache = make_cache
        self.runs: list[StepRun] = []
        self.pads: list[int] = []
        self.cache: Any = None

    @property
    def length(self) -> int:
        return layer_length(self.cache)

    def settle(self, runs: Sequence[StepRun]) -> None:
        """Make the rows exactly `runs`: others leave, newcomers join at the end."""
        wanted = set(map(id, runs))
        self.release([r for r in self.runs if id(r) not in wanted])
        joining = [r for r in runs if not r.in_batch]
        if joining:
            self._join(joining)

    def _join(self, joining: Sequence[StepRun]) -> None:
        caches = [r.s.cache for r in joining if r.s is not None]
        if not self.runs and len(caches) == 1:  # alone: the call's own cache, no copy
            self.cache, self.pads = caches[0], [0]
        else:
            held = self.length  # columns of the rows already in (each keeps its padding)
            lengths = [layer_length(c) for c in caches]
            width = max([held, *lengths])
            # (cache, rows) per source; an empty cache (a cold session) is all padding
            sources = ([(self.cache, len(self.runs))] if self.runs else []) + [
                (c, 1) for c in caches
            ]
            filled = [c for c, _ in sources if layer_length(c)]
            layers = len(filled[0].layers) if filled else 0
            self.cache = self.make_cache(
                (_stack(sources, i, "keys", width), _stack(sources, i, "values", width))
                for i in range(layers)
            )
            self.pads = [p + width - held for p in self.pads] + [width - n for n in lengths]
            # the rows now live in the batch alone: their own (or the old batch's) tensors
            # are let go, so no row's KV is held twice while it is batched
            for r in [*self.runs, *joining]:
                if r.s is not None:
                    r.s.cache = self.make_cache(())
        self.runs.extend(joining)
        for r in joining:
            r.in_batch = True

    def release(self, leaving: Sequence[StepRun]) -> None:
        """Give the leaving rows back to their calls' own caches; compact the rest."""
        if not leaving:
            return
        gone = set(map(id, leaving))
        if len(leaving) == len(self.runs) == 1:  # the lone row becomes the call's cache
            s = self.runs[0].s
            assert s is not None
            s.cache = self.cache
            for layer in s.cache.layers:
                layer.keys = layer.keys[:, :, self.pads[0] :]
                layer.values = layer.values[:, :, self.pads[0] :]
        else:
            for i, r in enumerate(self.runs):
                if id(r) in gone and r.s is not None:
                    pad = self.pads[i]
                    r.s.cache = self.make_cache(
                        (
                            lay.keys[i : i + 1, :, pad:].clone(),
                            lay.values[i : i + 1, :, pad:].clone(),
                        )
                        for lay in self.cache.layers
                    )
            keep = [i for i, r in enumerate(self.runs) if id(r) not in gone]
            if keep:
                margin = min(self.pads[i] for i in keep)  # columns every kept row pads
                for layer in self.cache.layers:
                    layer.keys = layer.keys[keep][:, :, margin:]  # list index: a copy
                    layer.values = layer.values[keep][:, :, margin:]
                self.pads = [self.pads[i] - margin for i in keep]
        for r in leaving:
            r.in_batch = False
        self.runs = [r for r in self.runs if id(r) not in gone]
        if not self.runs:
            self.cache, self.pads = None, []

    def recover(self, length: int) -> None:
        """After a failed forward: cut every layer back to `length` columns (some layers
        may have grown) and give every row back to its call, as after its last step."""
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, :length]
                layer.values = layer.values[:, :, :length]
        self.release(list(self.runs))


def layer_length(cache: Any) -> int:
    """Columns in a cache's first layer (0 for an empty or missing cache)."""
    layers = getattr(cache, "layers", None) or []
    keys = getattr(layers[0], "keys", None) if layers else None
    shape: tuple[int, ...] = tuple(getattr(keys, "shape", ()))
    return int(shape[2]) if len(shape) == 4 else 0


def _stack(sources: Sequence[tuple[Any, int]], layer: int, name: str, width: int) -> Any:
    """Layer `layer`'s `name` ("keys" / "values") of each (cache, rows) source -> one
    [sum rows, heads, width, dim] tensor, each part right-aligned (zeros, the padding, on
    its left). An empty source stays all padding. One copy of each part."""
    parts = [(getattr(c.layers[layer], name) if layer_length(c) else None, n) for c, n in sources]
    first = next(p for p, _ in parts if p is not None)
    rows = sum(n for _, n in parts)
    out = first.new_zeros((rows, first.shape[1], width, first.shape[3]))
    row = 0
    for p, n in parts:
        if p is not None:
            out[row : row + n, :, width - p.shape[2] :] = p
        row += n
    return out
