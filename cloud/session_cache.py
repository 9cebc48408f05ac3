"""The engine's per-session KV caches: who holds what, within a byte budget. No torch here.

A session's cache is either idle in an LRU table or running (checked out by a call in
progress, possibly as a row of the engine's decode batch). The KV tensors themselves
are opaque here: the engine passes how to make, measure and cut one.

  checkout  a call takes its session's cache (a fresh one on a miss); idle sessions
            past the TTL are evicted first
  checkin   the call puts it back as most recently used, then idle sessions are evicted
            LRU-first until idle + running bytes fit the budget. A running session is
            never evicted; the one checked in goes last.
  drop      EndSession or the text store's eviction: an idle cache goes at once; a
            running one is marked and discarded at its checkin, so no orphan cache
            outlives a dropped session.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud.engine_api import CacheStats


@dataclass
class CachedSession:
    ids: list[int]  # exactly the tokens whose KV the cache holds
    cache: Any  # the engine's KV cache object
    last_use: float
    held_bytes: int = 0  # its KV bytes when last checked in (counted in the table's total)
    dropped: bool = False  # dropped while running: discarded at checkin


class SessionCaches:
    def __init__(
        self,
        *,
        budget_bytes: int,
        ttl_s: float,
        new_cache: Callable[[], Any],
        nbytes: Callable[[Any], int],
        crop: Callable[[Any, int], None],
        bytes_per_token: int = 0,
        clock: Callable[[], float] = time.monotonic,
        running_bytes: Callable[[list[CachedSession]], int] | None = None,
        release: Callable[[Any], None] | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.bytes_per_token = bytes_per_token  # estimates running sessions' bytes
        self._new_cache, self._nbytes, self._crop = new_cache, nbytes, crop
        # what the running sessions really hold (the engine knows: padding, copies);
        # by default their tokens' KV
        self._running_bytes = running_bytes or self._token_bytes
        self._release = release or (lambda cache: None)  # a cache is given up for good
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: OrderedDict[str, CachedSession] = OrderedDict()  # LRU first
        self._running: dict[str, CachedSession] = {}
        self._idle_bytes = 0  # kept as a running total
        self.hits = self.misses = self.evictions = 0

    # ---- a call's life ---------------------------------------------------------------

    def checkout(self, key: str) -> CachedSession:
        """Take the session's cache for the duration of a call (a fresh one on a miss)."""
        now = self._clock()
        with self._lock:
            if key in self._running:  # the scheduler never lets this happen; a direct
                # caller racing itself gets a private cache that is not kept
                return CachedSession([], self._new_cache(), now, dropped=True)
            for sid, idle in list(self._idle.items()):
                if now - idle.last_use > self.ttl_s:
                    self._evict(sid)
            found = self._remove(key) or CachedSession([], None, now)
            self._running[key] = found
            self._fit()  # room for it first: a new cache may take memory the idle ones hold
            if found.cache is None:
                found.cache = self._new_cache()
            return found

    def checkin(self, key: str, s: CachedSession) -> None:
        """Put the session back as most recently used, unless it was dropped meanwhile."""
        self._crop(s.cache, len(s.ids))  # an interrupted forward may have left extra KV
        s.last_use = self._clock()
        s.held_bytes = self._nbytes(s.cache)  # O(layers) once per call
        with self._lock:
            if self._running.get(key) is s:
                del self._running[key]
            if s.dropped:
                self._release(s.cache)
                return
            self._idle[key] = s
            self._idle.move_to_end(key)
            self._idle_bytes += s.held_bytes
            self._fit()

    def count_reuse(self, kept: int) -> None:
        with self._lock:
            if kept > 0:
                self.hits += 1
            else:
                self.misses += 1

    def drop(self, key: str) -> bool:
        """Forget a session's cache; True if it existed (idle or running)."""
        with self._lock:
            running = self._running.get(key)
            if running is not None:
                running.dropped = True
            idle = self._remove(key)
            if idle is not None:
                self._release(idle.cache)
            return idle is not None or running is not None

    # ---- accounting ------------------------------------------------------------------

    def running_bytes(self) -> int:
        """What the running sessions hold, as the engine counts it."""
        return self._running_bytes(list(self._running.values()))

    def _token_bytes(self, running: list[CachedSession]) -> int:
        return sum(len(s.ids) for s in running) * self.bytes_per_token

    def _fit(self) -> None:
        """Evict idle sessions, least recently used first, until everything fits (lock held)."""
        while self._idle and self._idle_bytes + self.running_bytes() > self.budget_bytes:
            self._evict(next(iter(self._idle)))

    def _evict(self, key: str) -> None:
        found = self._remove(key)
        if found is not None:
            self._release(found.cache)
            self.evictions += 1

    def _remove(self, key: str) -> CachedSession | None:
        found = self._idle.pop(key, None)
        if found is not None:
            self._idle_bytes -= found.held_bytes
        return found

    def idle(self) -> dict[str, CachedSession]:
        with self._lock:
            return dict(self._idle)

    def running(self) -> dict[str, CachedSession]:
        with self._lock:
            return dict(self._running)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                sessions=len(self._idle),
                bytes=self._idle_bytes,
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
            )
