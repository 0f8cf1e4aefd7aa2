"""The per-pod token bucket (SEC-34) on a controllable clock: burst, refill, Retry-After, the fast
path's ``take`` deciding as ``allow`` would, and the bound on buckets kept."""

from __future__ import annotations

import pytest

from metaemu.server import limits
from metaemu.server.limits import RateLimiter
from metaemu.testing.fake_clock import FakeClock


def test_sec34_burst_then_refill_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=2, burst=3, clock=clock)
    assert [limiter.allow("pod") for _ in range(4)] == [None, None, None, 1]
    clock.advance(0.5)  # one token back
    assert limiter.allow("pod") is None
    assert limiter.allow("pod") == 1
    assert limiter.allow("other") is None  # another pod has its own bucket


def test_retry_after_is_the_whole_seconds_until_a_token() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=0.25, burst=1, clock=clock)
    assert limiter.allow("pod") is None
    assert limiter.allow("pod") == 4
    clock.advance(3)
    assert limiter.allow("pod") == 1


def test_a_refused_take_then_allow_decides_as_allow_alone() -> None:
    clock, twin_clock = FakeClock(), FakeClock()
    fast, alone = RateLimiter(rate_per_s=5, burst=2, clock=clock), RateLimiter(rate_per_s=5, burst=2, clock=twin_clock)
    for step in (0.0, 0.0, 0.0, 0.1, 0.05, 0.3, 0.0, 0.0):
        clock.advance(step)
        twin_clock.advance(step)
        expected = alone.allow("pod")
        got = None if fast.take("pod") else fast.allow("pod")  # the fast path hands a refusal over
        assert got == expected


def test_buckets_are_bounded_and_the_least_recently_used_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_BUCKETS", 3)
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=1, burst=1, clock=clock)
    for pod in ("a", "b", "c"):
        assert limiter.allow(pod) is None  # each bucket now empty
    assert limiter.allow("a") == 1  # a is used again: most recent
    assert limiter.allow("d") is None  # b, the least recently used, is dropped
    assert limiter.allow("a") == 1 and limiter.allow("c") == 1  # kept, still empty
    assert limiter.allow("b") is None  # forgotten: a new, full bucket
