"""Capacity limits for node mode: a token bucket per caller (SEC-34) so one pod flooding the
agent cannot starve its neighbours, and the refusal text for the global concurrency cap (SEC-35).

Buckets live in a bounded LRU keyed by pod UID (never an IP); time comes from the injected Clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from metaemu.clock import Clock

#: Buckets kept; more pods than this on one node is far beyond any kubelet's pod limit (110 default).
MAX_BUCKETS = 4096


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float  # monotonic time of the last update


class RateLimiter:
    def __init__(self, *, rate_per_s: float, burst: int, clock: Clock) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        # A plain dict kept in LRU order by hand (pop and re-insert): read on every request.
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> bool:
        """Take one token for ``key`` if there is one. A False here followed by ``allow`` at the
        same or a later time decides exactly as ``allow`` alone would (refilling is linear)."""
        return self.allow(key) is None

    def allow(self, key: str) -> int | None:
        """None when ``key`` may proceed (one token taken); else whole seconds until it may."""
        now = self._clock.monotonic()
        buckets = self._buckets
        bucket = buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(tokens=self._burst, at=now)
            if len(buckets) >= MAX_BUCKETS:
                del buckets[next(iter(buckets))]  # the least recently used
        buckets[key] = bucket
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - bucket.tokens) / self._rate))
