"""The engine's session caches: LRU within a byte budget, and what happens to a session
that is dropped or squeezed while its call is running (cloud.session_cache)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloud.session_cache import SessionCaches

TOKEN = 10  # bytes per token of the fake caches


@dataclass
class FakeCache:
    tokens: int = 0
    crops: list[int] = field(default_factory=list)


def crop(cache: FakeCache, n: int) -> None:
    cache.crops.append(n)
    cache.tokens = min(cache.tokens, n)


def caches(budget: int, ttl_s: float = 600.0, clock: list[float] | None = None) -> SessionCaches:
    now = clock if clock is not None else [0.0]
    return SessionCaches(
        budget_bytes=budget,
        ttl_s=ttl_s,
        new_cache=FakeCache,
        nbytes=lambda c: c.tokens * TOKEN,
        crop=crop,
        bytes_per_token=TOKEN,
        clock=lambda: now[0],
    )


def fill(store: SessionCaches, key: str, tokens: int) -> None:
    """One call on `key` that leaves `tokens` tokens of KV."""
    s = store.checkout(key)
    s.ids = list(range(tokens))
    s.cache.tokens = tokens
    store.checkin(key, s)


def test_a_session_dropped_while_its_call_runs_is_not_put_back():
    store = caches(budget=10_000)
    fill(store, "a", 5)
    running = store.checkout("a")  # a call on "a" is running
    assert store.drop("a") is True  # EndSession / the text store's TTL meanwhile
    running.ids.append(99)
    store.checkin("a", running)  # the call ends
    assert "a" not in store.idle() and "a" not in store.running()
    assert store.stats().sessions == 0 and store.stats().bytes == 0
    assert store.checkout("a").ids == []  # the next call starts cold


def test_a_running_session_is_never_evicted_idle_ones_go_least_recent_first():
    store = caches(budget=100 * TOKEN)
    fill(store, "old", 30)
    fill(store, "new", 30)
    served = store.checkout("served")
    served.ids = list(range(60))  # grows while running: idle 60 + running 60 > 100
    served.cache.tokens = 60
    fill(store, "other", 10)  # its checkin makes room: "old" goes, "served" cannot
    assert "served" in store.running()
    assert set(store.idle()) == {"new", "other"}
    store.checkin("served", served)
    assert "served" in store.idle()  # the one just served is kept; LRU idle ones went
    assert store.stats().bytes <= 100 * TOKEN


def test_idle_sessions_past_the_ttl_go_at_the_next_checkout():
    now = [0.0]
    store = caches(budget=10_000, ttl_s=60, clock=now)
    fill(store, "a", 5)
    now[0] = 61.0
    store.checkout("b")
    assert "a" not in store.idle()
    assert store.stats().evictions == 1


def test_a_second_call_racing_on_one_session_gets_a_private_cache():
    store = caches(budget=10_000)
    fill(store, "a", 5)
    first = store.checkout("a")
    second = store.checkout("a")
    assert second.ids == [] and second is not first
    store.checkin("a", second)  # not kept: the first call owns the session
    store.checkin("a", first)
    assert store.idle()["a"] is first


def test_checkin_crops_kv_an_interrupted_forward_left_beyond_the_ids():
    store = caches(budget=10_000)
    s = store.checkout("a")
    s.ids = [1, 2, 3]
    s.cache.tokens = 5
    store.checkin("a", s)
    assert s.cache.crops == [3] and s.cache.tokens == 3
