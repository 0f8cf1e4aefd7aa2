"""Every Prometheus metric metaemu exports, on a registry made per app (never the global one, so
tests can build many apps in one process).

Labels are bounded: route templates (not raw paths), backend and kind names, HTTP status codes,
fixed reason words. Never a token, audience, pod name or IP (SEC-33).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from metaemu import __version__

#: Metadata requests are served from memory in well under a millisecond; the buckets resolve the
#: sub-millisecond range and still show a request that waited on a cold exchange (up to ~2 s).
_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: STS / IAM answer in tens to hundreds of milliseconds; the default upstream timeout is 10 s.
_UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestStats(Collector):
    """``metaemu_requests_total{route,code}`` and ``metaemu_request_duration_seconds{route}``.

    Hand-written because it is on the hot path: prometheus-client takes a lock per sample update,
    which buys nothing on one event loop and cost a measurable share of a cached token request
    (benchmarks/README.md). Updates here are plain dict and list operations; the registry reads
    them through ``collect``. Not thread-safe by design: only the event loop thread records.
    """

    def __init__(self, buckets: Sequence[float]) -> None:
        self._bounds = tuple(buckets)
        self._counts: dict[tuple[str, int], int] = {}
        self._hist: dict[str, list[float]] = {}  # per bucket counts (+Inf last), then the sum

    def record(self, route: str, code: int, seconds: float) -> None:
        key = (route, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        row = self._hist.get(route)
        if row is None:
            row = self._hist[route] = [0.0] * (len(self._bounds) + 2)
        row[bisect.bisect_left(self._bounds, seconds)] += 1
        row[-1] += seconds

    def count(self, route: str, code: int) -> int:
        return self._counts.get((route, code), 0)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("metaemu_requests", "Metadata requests answered, by route template and "
                                       "status.", labels=["route", "code"])
        for (route, code), n in sorted(self._counts.items()):
            requests.add_metric([route, str(code)], n)
        yield requests
        duration = HistogramMetricFamily("metaemu_request_duration_seconds", "Time to answer a metadata request.",
                                         labels=["route"])
        for route, row in sorted(self._hist.items()):
            cumulative, buckets = 0.0, []
            for bound, in_bucket in zip((*self._bounds, float("inf")), row[:-1], strict=True):
                cumulative += in_bucket
                buckets.append((_le(bound), cumulative))
            duration.add_metric([route], buckets, sum_value=row[-1])
        yield duration


class LockFreeCounter(Collector):
    """A labelled counter for hot paths, updated without locks (see ``RequestStats``)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self._name, self._doc, self._labelnames = name, documentation, list(labelnames)
        self._counts: dict[tuple[str, ...], int] = {}

    def inc(self, *labels: str) -> None:
        self._counts[labels] = self._counts.get(labels, 0) + 1

    def inc_key(self, labels: tuple[str, ...]) -> None:
        """``inc`` with a label tuple built once by the caller (hot paths)."""
        self._counts[labels] = self._counts.get(labels, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, n in sorted(self._counts.items()):
            family.add_metric(list(labels), n)
        yield family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


@dataclass(frozen=True, slots=True, kw_only=True)
class Metrics:
    registry: CollectorRegistry
    requests: RequestStats
    refresh: Counter
    upstream_duration: Histogram
    upstream_errors: Counter
    token_expiry: Gauge
    last_refresh_success: Gauge
    stale_served: Counter
    blocked: Counter
    token_cache: LockFreeCounter
    long_polls: Gauge
    rate_limited: Counter
    build_info: Info


def create_metrics() -> Metrics:
    r = CollectorRegistry(auto_describe=True)
    m = Metrics(
        registry=r,
        requests=RequestStats(_REQUEST_BUCKETS),
        refresh=Counter("metaemu_refresh", "Token refresh attempts by token kind and result.",
                        ["kind", "result"], registry=r),
        upstream_duration=Histogram("metaemu_upstream_request_duration_seconds",
                                    "Duration of calls to upstream services.", ["backend"],
                                    buckets=_UPSTREAM_BUCKETS, registry=r),
        upstream_errors=Counter("metaemu_upstream_errors", "Failed upstream calls by backend and HTTP status "
                                "(0 = no response).", ["backend", "status"], registry=r),
        token_expiry=Gauge("metaemu_token_expiry_timestamp_seconds",
                           "Expiry (Unix time) of the current default token of each kind.", ["kind"], registry=r),
        last_refresh_success=Gauge("metaemu_last_refresh_success_timestamp_seconds",
                                   "Unix time of the last successful token refresh.", registry=r),
        stale_served=Counter("metaemu_stale_served", "Tokens served while their refresh was failing "
                             "(still valid, past their refresh point).", registry=r),
        blocked=Counter("metaemu_blocked_requests", "Requests refused by a request rule.", ["reason"], registry=r),
        token_cache=LockFreeCounter("metaemu_token_cache", "Token cache lookups and evictions.", ["kind", "result"]),
        long_polls=Gauge("metaemu_long_polls_in_flight", "wait_for_change requests being held.", registry=r),
        rate_limited=Counter("metaemu_rate_limited", "Requests refused with 429 by the per-pod rate limit (node mode).",
                             registry=r),
        build_info=Info("metaemu_build", "metaemu version.", registry=r),
    )
    r.register(m.requests)
    r.register(m.token_cache)
    m.build_info.info({"version": __version__})
    return m
