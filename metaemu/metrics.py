"""Every Prometheus metric metaemu exports, on a registry made per app (never the global one, so
tests can build many apps in one process).

Labels are bounded: route templates (not raw paths), backend and kind names, HTTP status codes,
fixed reason words. Never a token, audience, pod name or IP (SEC-33).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from metaemu import __version__

#: Metadata requests are served from memory in well under a millisecond; the buckets resolve the
#: sub-millisecond range and still show a request that waited on a cold exchange (up to ~2 s).
_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: STS / IAM answer in tens to hundreds of milliseconds; the default upstream timeout is 10 s.
_UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    refresh: Counter
    upstream_duration: Histogram
    upstream_errors: Counter
    token_expiry: Gauge
    last_refresh_success: Gauge
    stale_served: Counter
    blocked: Counter
    token_cache: Counter
    long_polls: Gauge
    build_info: Info


def create_metrics() -> Metrics:
    r = CollectorRegistry(auto_describe=True)
    m = Metrics(
        registry=r,
        requests=Counter("metaemu_requests", "Metadata requests answered, by route template and status.",
                         ["route", "code"], registry=r),
        request_duration=Histogram("metaemu_request_duration_seconds", "Time to answer a metadata request.",
                                   ["route"], buckets=_REQUEST_BUCKETS, registry=r),
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
        token_cache=Counter("metaemu_token_cache", "Token cache lookups and evictions.", ["kind", "result"],
                            registry=r),
        long_polls=Gauge("metaemu_long_polls_in_flight", "wait_for_change requests being held.", registry=r),
        build_info=Info("metaemu_build", "metaemu version.", registry=r),
    )
    m.build_info.info({"version": __version__})
    return m
