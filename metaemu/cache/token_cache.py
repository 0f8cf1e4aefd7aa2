"""A bounded, keyed token cache with single-flight fetches, refresh scheduling and backoff.

Each key holds at most one token. A lookup (``get``) never waits on upstream when a servable token
is cached; a background ``Refresher`` replaces tokens well before expiry (``due`` / ``refresh``).

Freshness of a cached token, by remaining lifetime:

    fresh    before its refresh point (about half its lifetime, at least 10 min before expiry)
    due      past the refresh point: still served, the refresher is replacing it
    unusable less than ``serve_floor_s`` left: never served (T-05, T-07); a request waits for the
             single in-flight fetch up to its deadline, then gets the last error (403/503)

Failures set ``retry_at`` with capped, jittered exponential backoff; until then a request on a key
with no servable token gets the last error immediately, so 1000 requests never make 1000 upstream
calls (SEC-29). Concurrency: one event loop; one in-flight fetch task per key (SEC-27, UP-19).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachetools import LRUCache

from metaemu.clock import Clock
from metaemu.credentials.tokens import Token
from metaemu.errors import CredentialError
from metaemu.metrics import Metrics

K = TypeVar("K", bound=Hashable)
T = TypeVar("T", bound=Token)

log = logging.getLogger(__name__)

#: Clients re-fetch below 5 min (Node, T-04), so nothing with less is served (T-05, T-07).
SERVE_FLOOR_S = 300.0
#: Refresh when half the lifetime is gone or 10 min remain, whichever is first (T-05 recommends
#: refreshing below 10 min; half-life leaves a 30 min window to ride out an upstream outage and
#: costs at most two exchanges per hour per token).
REFRESH_MIN_REMAINING_S = 600.0
#: Up to this fraction of the refresh interval is taken off at random so that many metaemu
#: instances started together do not refresh in lockstep.
REFRESH_JITTER_FRACTION = 0.1
#: A key requested within this window is kept warm. Clients re-ask about once per token lifetime
#: (google-auth at 56 min of 60, T-04), so one hour plus margin keeps every active client's next
#: request a cache hit, while keys nobody asks for stop costing upstream calls.
KEEP_WARM_S = 3900.0
#: Backoff after a failed fetch: 1 s doubling to 60 s, each multiplied by U(0.5, 1) ("equal jitter").
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0


@dataclass(slots=True)
class _Entry(Generic[T]):
    token: T | None = None
    refresh_at: float = 0.0  # monotonic
    retry_at: float = 0.0  # monotonic; 0 when the last fetch succeeded
    failures: int = 0
    last_error: CredentialError | None = None
    task: asyncio.Task[T] | None = None
    last_used: float = float("-inf")  # monotonic time of the last request
    pinned: bool = False  # always keep warm (the default token); never evicted


class TokenCache(Generic[K, T]):
    def __init__(
        self,
        *,
        kind: str,
        fetch: Callable[[K], Awaitable[T]],
        clock: Clock,
        metrics: Metrics,
        maxsize: int,
        serve_floor_s: float = SERVE_FLOOR_S,
        on_schedule_change: Callable[[float | None], None] = lambda at: None,
        rng: random.Random | None = None,
    ) -> None:
        self.kind = kind
        self._fetch = fetch
        self._clock = clock
        self._metrics = metrics
        self._floor = serve_floor_s
        self._entries: LRUCache[K, _Entry[T]] = LRUCache(maxsize=maxsize)
        self._pinned: dict[K, _Entry[T]] = {}  # outside the LRU: a flood of keys cannot evict these
        self._on_schedule_change = on_schedule_change
        self._rng = rng or random.Random()
        self._hit_labels = (kind, "hit")

    def __len__(self) -> int:
        return len(self._entries) + len(self._pinned)

    @property
    def in_flight(self) -> int:
        """Fetches running now (for readiness checks and tests that wait for quiescence)."""
        return sum(1 for _, e in self._all() if e.task is not None)

    def pin(self, key: K) -> None:
        """Keep ``key`` warm whether or not it is requested (the default token)."""
        entry = self._entries.pop(key, None) or self._pinned.get(key) or _Entry()
        entry.pinned = True
        self._pinned[key] = entry
        self._on_schedule_change(None)

    def _all(self) -> list[tuple[K, _Entry[T]]]:
        return [*self._pinned.items(), *self._entries.items()]

    def peek(self, key: K) -> T | None:
        """The cached token if it is servable now; never fetches."""
        entry = self._pinned.get(key) or self._entries.get(key)
        if entry is None or entry.token is None:
            return None
        return entry.token if entry.token.remaining_s(self._clock.now()) >= self._floor else None

    def servable(self, key: K, now_ts: float) -> object | None:
        """What ``get_nowait(key, now_ts)`` would return, not yet counted: ``served()`` on it
        counts it exactly as ``get_nowait`` would (for a caller that may still decline to serve
        it, the fast path); None when it would return None. Counts nothing."""
        entry = self._pinned.get(key) or self._entries.get(key)
        if entry is None or entry.token is None or entry.token.expiry_ts - now_ts < self._floor:
            return None
        return entry

    def served(self, found: object) -> T:
        """Count ``found`` (from ``servable`` in this same loop iteration) as served; its token."""
        assert isinstance(found, _Entry)
        token: T | None = found.token
        assert token is not None
        found.last_used = self._clock.monotonic()
        self._metrics.token_cache.inc_key(self._hit_labels)
        if found.last_error is not None:
            self._metrics.stale_served.inc()
        return token

    def get_nowait(self, key: K, now_ts: float) -> T | None:
        """The servable cached token for ``key`` (counted as a hit), or None; never fetches.

        The request hot path (``now_ts`` is ``Clock.time()``): no await, float arithmetic only. A
        None here is followed by ``get``, which counts the miss and fetches.
        """
        entry = self._pinned.get(key) or self._entries.get(key)
        if entry is None or entry.token is None or entry.token.expiry_ts - now_ts < self._floor:
            return None
        entry.last_used = self._clock.monotonic()
        self._metrics.token_cache.inc_key(self._hit_labels)
        if entry.last_error is not None:
            self._metrics.stale_served.inc()
        return entry.token

    async def get(self, key: K, *, wait_s: float) -> T:
        """A servable token for ``key``.

        Served from memory when one is cached. Otherwise waits up to ``wait_s`` for the (single)
        fetch; raises ``CredentialError``: the fetch's own error, or a transient "not ready" one.
        """
        entry = self._entry(key)
        entry.last_used = self._clock.monotonic()
        token = entry.token
        if token is not None and token.remaining_s(self._clock.now()) >= self._floor:
            self._metrics.token_cache.inc(self.kind, "hit")
            if entry.last_error is not None:
                self._metrics.stale_served.inc()
            return token
        self._metrics.token_cache.inc(self.kind, "miss")
        if entry.last_error is not None and self._clock.monotonic() < entry.retry_at and entry.task is None:
            raise entry.last_error
        task = self._start(key, entry)
        if not task.done():
            # Wait on the Clock (not asyncio.wait_for) so the deadline is testable; the fetch
            # itself is never cancelled by a waiter giving up: its result is cached for the retry.
            finished = asyncio.Event()
            task.add_done_callback(lambda _: finished.set())
            await self._clock.sleep(wait_s, until=finished)
        if not task.done():
            raise CredentialError(f"no {self.kind.replace('_', ' ')} yet: the upstream exchange is still in progress")
        if task.cancelled():
            raise CredentialError(f"the {self.kind.replace('_', ' ')} fetch was cancelled")
        return task.result()

    def due(self) -> list[K]:
        """Keys whose token should be refreshed now (warm, past their refresh or retry point)."""
        now = self._clock.monotonic()
        out = []
        for key, entry in self._all():
            if entry.task is not None or not self._warm(entry, now):
                continue
            at = entry.retry_at if entry.last_error is not None else entry.refresh_at
            if now >= at:
                out.append(key)
        return out

    def next_due(self) -> float | None:
        """Monotonic time of the next scheduled refresh, if any."""
        now = self._clock.monotonic()
        times = [
            (e.retry_at if e.last_error is not None else e.refresh_at)
            for _, e in self._all()
            if e.task is None and self._warm(e, now)
        ]
        return min(times) if times else None

    @staticmethod
    def _warm(entry: _Entry[T], now: float) -> bool:
        return entry.pinned or now - entry.last_used < KEEP_WARM_S

    def refresh(self, key: K) -> asyncio.Task[T]:
        """Start (or join) the single fetch for ``key``; the returned task never raises to nobody."""
        return self._start(key, self._entry(key))

    def _entry(self, key: K) -> _Entry[T]:
        entry = self._pinned.get(key) or self._entries.get(key)
        if entry is None:
            if self._entries.currsize >= self._entries.maxsize:
                self._metrics.token_cache.inc(self.kind, "evict")
            entry = _Entry()
            self._entries[key] = entry
        return entry

    def _start(self, key: K, entry: _Entry[T]) -> asyncio.Task[T]:
        if entry.task is None:
            entry.task = asyncio.create_task(self._run_fetch(key, entry), name=f"fetch-{self.kind}")
            entry.task.add_done_callback(_consume_exception)
        return entry.task

    async def _run_fetch(self, key: K, entry: _Entry[T]) -> T:
        try:
            token = await self._fetch(key)
            left = token.remaining_s(self._clock.now())
            if left < self._floor:
                # T-05/T-06: never serve it. Google mints ~1 h tokens, so this means our clock is
                # far ahead of Google's (or upstream misbehaves): say so instead of serving.
                raise CredentialError(f"upstream returned a {self.kind.replace('_', ' ')} that expires in "
                                      f"{left:.0f} s (below the {self._floor:.0f} s floor); is the clock right?")
        except CredentialError as exc:
            self._record_failure(entry, exc)
            self._on_schedule_change(entry.retry_at)
            raise
        except Exception as exc:  # a bug must not kill the refresher or leak a traceback to clients
            log.exception("unexpected error fetching %s", self.kind)
            error = CredentialError(f"internal error fetching {self.kind}: {type(exc).__name__}")
            self._record_failure(entry, error)
            self._on_schedule_change(entry.retry_at)
            raise error from exc
        finally:
            entry.task = None
        self._record_success(entry, token)
        self._on_schedule_change(entry.refresh_at)
        return token

    def _record_success(self, entry: _Entry[T], token: T) -> None:
        remaining = token.remaining_s(self._clock.now())
        interval = remaining - max(remaining / 2, REFRESH_MIN_REMAINING_S)
        interval -= self._rng.uniform(0, REFRESH_JITTER_FRACTION) * max(interval, 0.0)
        entry.token = token
        entry.refresh_at = self._clock.monotonic() + max(interval, 1.0)
        entry.failures, entry.retry_at, entry.last_error = 0, 0.0, None
        self._metrics.refresh.labels(self.kind, "success").inc()
        self._metrics.last_refresh_success.set(self._clock.now().timestamp())
        if entry.pinned:
            self._metrics.token_expiry.labels(self.kind).set(token.expiry.timestamp())

    def _record_failure(self, entry: _Entry[T], error: CredentialError) -> None:
        entry.failures += 1
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (entry.failures - 1))
        entry.retry_at = self._clock.monotonic() + delay * self._rng.uniform(0.5, 1.0)
        entry.last_error = error
        self._metrics.refresh.labels(self.kind, "error").inc()
        log.warning("refresh failed", extra={"kind": self.kind, "failures": entry.failures,
                                             "permanent": error.permanent, "reason": error.reason})
        if entry.token is not None and entry.token.remaining_s(self._clock.now()) < self._floor:
            entry.token = None  # SECURITY/T-06: an unusable token is dropped, never served


def _consume_exception(task: asyncio.Task[object]) -> None:
    """Fetch errors are recorded on the entry; mark them retrieved so asyncio does not warn."""
    if not task.cancelled():
        task.exception()
