"""Node-mode metrics, registered on the app's registry (to be folded into ``metaemu.metrics``).

Labels are fixed words only: never a pod name, namespace or IP (SEC-33, SEC-40).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from metaemu.metrics import LockFreeCounter

#: ``metaemu_pod_lookup_total{result}``: exactly one per ``IdentityResolver.resolve`` call.
LookupResult = Literal["found", "not_found", "ambiguous", "api_fallback", "host_network"]
LOOKUP_RESULTS: tuple[LookupResult, ...] = ("found", "not_found", "ambiguous", "api_fallback", "host_network")


@dataclass(frozen=True, slots=True, kw_only=True)
class PodMetrics:
    #: On the request path, hence lock-free (see ``metaemu.metrics.RequestStats``).
    lookups: LockFreeCounter
    watch_synced: Gauge
    watch_restarts: Counter
    account_watch_synced: Gauge
    account_watch_restarts: Counter
    prefetches: Counter

    def lookup(self, result: LookupResult) -> None:
        self.lookups.inc(result)


def create_pod_metrics(registry: CollectorRegistry) -> PodMetrics:
    lookups = LockFreeCounter(
        "metaemu_pod_lookup", "Caller address to pod resolutions by result: found, not_found (403), ambiguous "
        "(503), api_fallback (index miss settled by a live API lookup: 503 Retry-After), host_network (403).",
        ["result"])
    registry.register(lookups)
    return PodMetrics(
        lookups=lookups,
        watch_synced=Gauge("metaemu_pod_watch_synced", "1 once the node-scoped pod list has completed.",
                           registry=registry),
        watch_restarts=Counter("metaemu_pod_watch_restarts", "Pod watches restarted, by reason: expired "
                               "(410 Gone, relist) or error.", ["reason"], registry=registry),
        account_watch_synced=Gauge("metaemu_service_account_watch_synced", "1 once the service-account watch "
                                   "has started (annotation changes then apply as events).", registry=registry),
        account_watch_restarts=Counter("metaemu_service_account_watch_restarts", "Service-account watches "
                                       "restarted, by reason: expired (410 Gone, every record held read again) "
                                       "or error.", ["reason"], registry=registry),
        prefetches=Counter("metaemu_pod_prefetches", "Credential prefetches for pods the watch saw get an address, "
                           "by result: started (an exchange began or was joined), cached (already servable), "
                           "failed (the service account could not be read), cancelled (the pod went first).",
                           ["result"], registry=registry),
    )
