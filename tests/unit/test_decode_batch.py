"""The decode batch's bookkeeping (cloud.batching): rows join and leave between steps and
every row keeps exactly its own tokens, right-aligned, whatever the order of events.

Each token's K/V value encodes (session, position), so a misplaced column shows up."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from cloud.batching import DecodeBatch, StepRun
from cloud.session_cache import CachedSession
from shared.wire import Sampling

torch = pytest.importorskip("torch")

LAYERS, HEADS, DIM = 2, 1, 1


@dataclass
class Layer:
    keys: Any
    values: Any


@dataclass
class Cache:
    layers: list[Layer] = field(default_factory=list)


def make_cache(layers: Iterable[tuple[Any, Any]]) -> Cache:
    return Cache([Layer(k, v) for k, v in layers])


def token(session: int, position: int) -> float:
    return session * 1000 + position


def own_cache(session: int, length: int) -> Cache:
    if not length:
        return Cache()  # a cold session's cache has no layers yet
    col = torch.tensor([token(session, p) for p in range(length)]).view(1, HEADS, length, DIM)
    return make_cache((col.clone(), -col.clone()) for _ in range(LAYERS))


def run(session: int, length: int) -> StepRun:
    r = StepRun(str(session), [0] * (length + 1), lambda: False, None, Sampling(), None)
    r.s = CachedSession(list(range(length)), own_cache(session, length), 0.0)
    return r


def step(batch: DecodeBatch) -> None:
    """What a decode forward does to the cache: one new column for every row."""
    for layer in batch.cache.layers:
        new = torch.tensor(
            [token(int(r.session), len(r.s.ids)) for r in batch.runs]  # type: ignore[union-attr]
        ).view(-1, HEADS, 1, DIM)
        layer.keys = torch.cat([layer.keys, new], dim=2)
        layer.values = torch.cat([layer.values, -new], dim=2)
    for r in batch.runs:
        assert r.s is not None
        r.s.ids.append(0)


def expected(session: int, length: int) -> list[float]:
    return [token(session, p) for p in range(length)]


def check_rows(batch: DecodeBatch) -> None:
    for i, r in enumerate(batch.runs):
        assert r.s is not None
        n = len(r.s.ids)
        for layer in batch.cache.layers:
            assert batch.pads[i] + n == layer.keys.shape[2]
            assert layer.keys[i, 0, batch.pads[i] :, 0].tolist() == expected(int(r.session), n)
            assert layer.values[i, 0, batch.pads[i] :, 0].tolist() == [
                -x for x in expected(int(r.session), n)
            ]


def check_own(r: StepRun) -> None:
    assert r.s is not None
    for layer in r.s.cache.layers:
        assert layer.keys[0, 0, :, 0].tolist() == expected(int(r.session), len(r.s.ids))


def test_rows_joining_and_leaving_in_any_order_keep_their_own_tokens():
    batch = DecodeBatch(make_cache)
    a, b, c, d = run(1, 3), run(2, 7), run(3, 5), run(4, 1)
    batch.settle([a])
    assert batch.cache is a.s.cache  # alone: its own cache, no copy
    step(batch)
    batch.settle([a, b])  # a longer row joins a shorter one
    check_rows(batch)
    step(batch)
    batch.settle([a, b, c])  # a third joins a padded batch
    check_rows(batch)
    step(batch)
    batch.settle([b, c])  # a leaves: back in its own cache, the rest compacted
    check_own(a)
    check_rows(batch)
    step(batch)
    batch.settle([b, c, d])
    check_rows(batch)
    step(batch)
    batch.release([b, d])
    check_own(b)
    check_own(d)
    check_rows(batch)
    step(batch)
    batch.release([c])  # the last row becomes c's own cache again
    check_own(c)
    assert batch.runs == [] and batch.cache is None


def test_a_cold_session_joins_as_a_row_of_padding():
    batch = DecodeBatch(make_cache)
    warm, cold = run(1, 4), run(2, 0)
    batch.settle([warm, cold])
    assert batch.pads == [0, 4]
    check_rows(batch)
    step(batch)
    check_rows(batch)
    batch.release([cold])
    check_own(cold)
    check_rows(batch)


def test_a_failed_step_gives_every_row_back_as_after_its_last_completed_step():
    batch = DecodeBatch(make_cache)
    a, b = run(1, 4), run(2, 2)
    batch.settle([a, b])
    step(batch)
    before = batch.length
    layer = batch.cache.layers[0]  # the forward failed after growing one layer
    layer.keys = torch.cat([layer.keys, layer.keys[:, :, -1:]], dim=2)
    batch.recover(before)
    check_own(a)
    check_own(b)
    assert not a.in_batch and not b.in_batch
