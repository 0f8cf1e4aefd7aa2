"""TokenCache and Refresher on a fake clock: single-flight, refresh schedule, backoff, stale serving
and expiry discipline (gce-metadata.md T-01..T-07; security.md SEC-27..SEC-29; upstream.md UP-19)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest

from metaemu.cache.refresher import Refresher
from metaemu.cache.token_cache import BACKOFF_CAP_S, SERVE_FLOOR_S, TokenCache
from metaemu.credentials.tokens import AccessToken
from metaemu.errors import CredentialError, UpstreamError
from metaemu.metrics import Metrics, create_metrics
from metaemu.testing.fake_clock import FakeClock, settle


class Upstream:
    """A controllable fetch: counts calls, can fail, can be held open."""

    def __init__(self, clock: FakeClock, lifetime_s: float = 3600) -> None:
        self.clock = clock
        self.lifetime_s = lifetime_s
        self.calls = 0
        self.fail_with: CredentialError | None = None
        self.gate: asyncio.Event | None = None

    async def fetch(self, key: str) -> AccessToken:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return AccessToken(value=f"tok-{key}-{self.calls}",
                           expiry=self.clock.now() + dt.timedelta(seconds=self.lifetime_s))


def sample(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return create_metrics()


def make_cache(clock: FakeClock, metrics: Metrics, upstream: Upstream, *, maxsize: int = 8,
               refresher: Refresher | None = None) -> TokenCache[str, AccessToken]:
    return TokenCache(kind="access_token", fetch=upstream.fetch, clock=clock, metrics=metrics, maxsize=maxsize,
                      rng=random.Random(7), on_schedule_change=refresher.wake if refresher else (lambda at: None))


TRANSIENT = UpstreamError(service="sts", url="u", status=503, body={"error": "unavailable"}, retryable=True)
DENIED = UpstreamError(service="iam", url="u", status=403, body={"error": {"status": "PERMISSION_DENIED",
                                                                          "message": "denied"}}, retryable=False)


async def test_sec27_concurrent_misses_make_exactly_one_upstream_call(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock)
    up.gate = asyncio.Event()
    cache = make_cache(clock, metrics, up)
    waiters = [asyncio.create_task(cache.get("k", wait_s=2.0)) for _ in range(100)]
    await settle()
    up.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert up.calls == 1
    assert {t.value for t in tokens} == {"tok-k-1"}


async def test_t02_same_token_from_memory_until_replaced(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock)
    cache = make_cache(clock, metrics, up)
    first = await cache.get("k", wait_s=2.0)
    clock.advance(600)
    again = await cache.get("k", wait_s=2.0)
    assert again is first
    assert up.calls == 1
    assert again.expires_in(clock.now()) == 3000  # T-01: decreasing, whole seconds
    assert sample(metrics, "metaemu_token_cache_total", kind="access_token", result="hit") == 1


async def test_refresh_is_due_at_half_life_with_jitter_not_before(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock)
    cache = make_cache(clock, metrics, up)
    await cache.get("k", wait_s=2.0)
    due_at = cache.next_due()
    assert due_at is not None
    # half of 3600 s, minus at most 10 % jitter of the interval
    assert 1800 * 0.9 <= due_at - clock.monotonic() <= 1800
    clock.advance(due_at - clock.monotonic() - 1)
    assert cache.due() == []
    clock.advance(1)
    assert cache.due() == ["k"]


async def test_short_tokens_refresh_ten_minutes_before_expiry(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock, lifetime_s=900)
    cache = make_cache(clock, metrics, up)
    await cache.get("k", wait_s=2.0)
    due_in = (cache.next_due() or 0) - clock.monotonic()
    assert 300 * 0.9 <= due_in <= 300  # 900 - max(450, 600)


async def test_refresher_replaces_tokens_in_the_background(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock)
    refresher = Refresher(clock=clock)
    cache = make_cache(clock, metrics, up, refresher=refresher)
    refresher.add(cache)
    cache.pin("default")
    task = asyncio.create_task(refresher.token_refresher())
    try:
        await settle()
        assert up.calls == 1  # the first token is fetched at start-up, unasked
        first = cache.peek("default")
        assert first is not None
        clock.advance(1801)
        await settle()
        assert up.calls == 2
        second = await cache.get("default", wait_s=2.0)
        assert second.value != first.value  # T-02: then a new token
        assert second.expires_in(clock.now()) == 3600
    finally:
        refresher.stop()
        await task


async def test_keys_requested_within_a_lifetime_stay_warm_idle_ones_do_not(clock: FakeClock,
                                                                            metrics: Metrics) -> None:
    up = Upstream(clock)
    cache = make_cache(clock, metrics, up)
    await cache.get("once", wait_s=2.0)  # like google-auth: asks, then again ~56 min later
    clock.advance(1800)
    assert cache.due() == ["once"]  # still warm: its client will be back
    await cache.refresh("once")
    clock.advance(2100)  # 3900 s since the only request: nobody is coming back for it
    assert cache.due() == []
    assert cache.next_due() is None


async def test_sec28_stale_token_served_while_refresh_fails_and_counted(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock)
    cache = make_cache(clock, metrics, up)
    good = await cache.get("k", wait_s=2.0)
    up.fail_with = TRANSIENT
    clock.advance(1900)
    await asyncio.gather(cache.refresh("k"), return_exceptions=True)
    served = await cache.get("k", wait_s=2.0)
    assert served is good
    assert sample(metrics, "metaemu_stale_served_total") == 1
    assert sample(metrics, "metaemu_refresh_total", kind="access_token", result="error") == 1


async def test_t05_never_serves_below_the_floor_then_503_reason(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock)
    cache = make_cache(clock, metrics, up)
    await cache.get("k", wait_s=2.0)
    up.fail_with = TRANSIENT
    clock.advance(3600 - SERVE_FLOOR_S + 1)  # 299 s left: unusable
    with pytest.raises(UpstreamError) as err:
        await cache.get("k", wait_s=2.0)
    assert err.value.permanent is False
    assert cache.peek("k") is None


async def test_sec29_failures_back_off_instead_of_one_call_per_request(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock)
    up.fail_with = DENIED
    cache = make_cache(clock, metrics, up)
    for _ in range(1000):
        with pytest.raises(UpstreamError) as err:
            await cache.get("k", wait_s=2.0)
        assert err.value.permanent
    assert up.calls == 1
    clock.advance(1.0)  # first backoff is U(0.5, 1) x 1 s
    with pytest.raises(UpstreamError):
        await cache.get("k", wait_s=2.0)
    assert up.calls == 2


async def test_backoff_doubles_and_is_capped(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock)
    up.fail_with = TRANSIENT
    cache = make_cache(clock, metrics, up)
    cache.pin("k")
    delays = []
    for _ in range(10):
        await asyncio.gather(cache.refresh("k"), return_exceptions=True)
        at = cache.next_due()
        assert at is not None
        delays.append(at - clock.monotonic())
        clock.advance(delays[-1])
    assert all(0.5 * min(BACKOFF_CAP_S, 2**i) <= d <= min(BACKOFF_CAP_S, 2**i) for i, d in enumerate(delays))
    assert max(delays) <= BACKOFF_CAP_S


async def test_first_request_waits_at_most_its_deadline_then_transient_error(clock: FakeClock,
                                                                              metrics: Metrics) -> None:
    up = Upstream(clock)
    up.gate = asyncio.Event()
    cache = make_cache(clock, metrics, up)
    request = asyncio.create_task(cache.get("k", wait_s=2.0))
    await clock.wait_for_sleepers(1)
    clock.advance(2.0)
    with pytest.raises(CredentialError) as err:
        await request
    assert not err.value.permanent
    assert "in progress" in err.value.reason
    up.gate.set()  # the exchange finishes after the waiter gave up: its token is kept for the retry
    await settle()
    assert (await cache.get("k", wait_s=2.0)).value == "tok-k-1"
    assert up.calls == 1


async def test_lru_bound_and_pinned_key_survives_a_flood(clock: FakeClock, metrics: Metrics) -> None:
    up = Upstream(clock)
    cache = make_cache(clock, metrics, up, maxsize=8)
    cache.pin("default")
    await cache.get("default", wait_s=2.0)
    for i in range(100):
        await cache.get(f"aud-{i}", wait_s=2.0)
    assert len(cache) == 9
    assert cache.peek("default") is not None
    assert sample(metrics, "metaemu_token_cache_total", kind="access_token", result="evict") == 92


async def test_unexpected_exception_becomes_a_credential_error(clock: FakeClock, metrics: Metrics) -> None:
    async def broken(_: str) -> AccessToken:
        raise KeyError("bug")

    cache: TokenCache[str, AccessToken] = TokenCache(kind="access_token", fetch=broken, clock=clock,
                                                     metrics=metrics, maxsize=4)
    with pytest.raises(CredentialError, match="internal error"):
        await cache.get("k", wait_s=2.0)
