"""Service accounts of this node's pods: UID and Google-account annotation, read on demand and
kept current by a watch (issue #11).

Only the service accounts of this node's pods are held (memory proportional to the node, SEC-39):
each is read on first use (``get``), and from then on kept current by ``ServiceAccountWatcher``, one
cluster-wide watch of service accounts whose events are applied to the records held and dropped for
the rest. It cannot be node-scoped (service accounts have no node), so every agent receives every
service-account change of the cluster; they are rare (the token controller no longer writes
them), and what it holds stays bounded. An annotation change reaches the agent as an event, in
milliseconds, and applies at once (``on_change``).

While the watch is live a record is current without re-reading it. When the watch is down (API
outage, reconnect backoff) records fall back to a TTL counted from the moment it went down, and are
read again (``get``, or ``refresh`` ahead of time from the fast path); when its history expired
(410 Gone, relist) every record held is read again, since events may have been missed. A read that
races with an event for the same service account keeps the event: events are applied in order,
so the latest one always ends up held.

During an API outage a record that has expired is still served (SEC-36: pods seen before keep
working), and the API is asked again only every ``RETRY_S``. A 404 drops the record: a deleted
service account has no identity. Reads are single-flight per service account.

Residual window: a silently broken watch connection (no RST through a NAT) is noticed when the
reflector's stall timer fires (``reflector.WATCH_TIMEOUT_S + WATCH_GRACE_S``); until then a change
is not seen. The API server ends every watch after ``WATCH_TIMEOUT_S``, which bounds it.

Not owned here: what the record is used for (``identity``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Final

from prometheus_client import Counter, Gauge

from metaemu.clock import Clock
from metaemu.errors import UpstreamError
from metaemu.pods.kube_client import KubeClient, WatchEvent
from metaemu.pods.objects import ServiceAccountRecord
from metaemu.pods.reflector import Reflector
from metaemu.pods.single_flight import SingleFlight

log = logging.getLogger(__name__)

#: The annotation GKE Workload Identity reads (issue #4 default).
DEFAULT_ANNOTATION = "iam.gke.io/gcp-service-account"
#: While the watch is down, records are read again once this old (counted from when it went down):
#: annotation changes still take effect within a minute then (issue #4); the other half is the
#: token cache's, which keys on the annotation's value (SEC-26).
TTL_S = 30.0
#: After a failed refresh the stale record is served without asking again for this long, so an
#: outage costs one API call per service account per 10 s rather than one per request.
RETRY_S = 10.0
#: A read happens on the request path of a pod's first request (and once per TTL after): bounded
#: like the live pod lookup (``identity.LIVE_LOOKUP_TIMEOUT_S``) so SEC-09's wait stays short.
READ_TIMEOUT_S = 2.0
#: LRU bound. Only service accounts of this node's pods are read (110 pods per node by default), so
#: this is never reached in normal operation; it caps memory against churn (SEC-39).
MAX_ENTRIES = 4096

_Key = tuple[str, str]
#: A read in flight for which no event has arrived yet.
_UNSEEN: Final = object()


@dataclass(slots=True)
class _Entry:
    record: ServiceAccountRecord
    fetched_at: float  # monotonic: when it was read, or confirmed by the watch going down
    epoch: int  # the watch's continuity epoch it was read in
    retry_at: float = float("-inf")  # monotonic; set after a failed refresh


class ServiceAccountCache:
    """``get(namespace, name)`` → ``ServiceAccountRecord``. One event loop; not thread-safe."""

    def __init__(self, *, kube: KubeClient, clock: Clock, annotation: str = DEFAULT_ANNOTATION,
                 ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES) -> None:
        self._kube = kube
        self._clock = clock
        self.annotation = annotation
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._reads: SingleFlight[_Key, ServiceAccountRecord] = SingleFlight("service account read")
        #: Reads in flight → the latest event seen for their key meanwhile (None: deleted).
        self._racing: dict[_Key, object] = {}
        #: True while a watch delivers every change (``watch_live``); bumped on each relist.
        self._live = False
        self._epoch = 0
        #: Called with (namespace, name) when a record is replaced by a different one or dropped.
        self.on_change: Callable[[_Key], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[_Key]:
        return list(self._entries)

    async def aclose(self) -> None:
        await self._reads.aclose()

    async def get(self, namespace: str, name: str) -> ServiceAccountRecord:
        """The current record: as the watch keeps it, else at most ``ttl_s`` old while the API answers.

        Raises ``UpstreamError``: ``status == 404`` when the service account does not exist;
        otherwise (API unreachable, 5xx) only when no earlier record is known.
        """
        key = (namespace, name)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            if self._until(entry) > self._clock.monotonic():
                return entry.record
        return await self._reads.run(key, lambda: self._read(key))

    async def refresh(self, namespace: str, name: str) -> None:
        """Read the record again now (single-flight with ``get``), as ``get`` does once it is due:
        the fast path calls this shortly before, so pods it serves never wait on the read."""
        with contextlib.suppress(UpstreamError):
            await self._reads.run((namespace, name), lambda: self._read((namespace, name)))

    def peek(self, namespace: str, name: str) -> tuple[ServiceAccountRecord, float] | None:
        """The record ``get`` would return from memory now (no API call) and the monotonic time
        until which it would keep returning it without asking the API (while the watch is live, a
        TTL from now: were it to go down, the fast path looks again within that); None when
        ``get`` would ask now."""
        key = (namespace, name)
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock.monotonic()
        until = self._until(entry)
        if now < until:
            self._entries.move_to_end(key)
            return entry.record, min(until, now + self._ttl_s)
        return None

    def raced(self, namespace: str, name: str) -> bool:
        """Whether a watch event arrived for this service account while a read of it is in flight."""
        return self._racing.get((namespace, name), _UNSEEN) is not _UNSEEN

    def _until(self, entry: _Entry) -> float:
        if self._live and entry.epoch == self._epoch:
            return float("inf")
        return max(entry.fetched_at + self._ttl_s, entry.retry_at)

    # -- the watch's side --------------------------------------------------------------------------

    def apply(self, event_type: str, record: ServiceAccountRecord) -> None:
        """A watch event: applied to a record held or being read; ignored for every other."""
        key = (record.namespace, record.name)
        deleted = event_type == "DELETED"
        if key in self._racing:
            self._racing[key] = None if deleted else record
        if key not in self._entries:
            return
        if deleted:
            self._drop(key)
        else:
            self._store(key, record)

    def watch_live(self, live: bool) -> None:
        """The watch opened (every change from here on is an event) or closed (records held are
        current as of now, and age by the TTL from now on)."""
        if self._live and not live:
            now = self._clock.monotonic()
            for entry in self._entries.values():
                if entry.epoch == self._epoch:
                    entry.fetched_at = max(entry.fetched_at, now)
        self._live = live

    async def resynced(self) -> None:
        """The watch starts over from a new list (its history expired, or the agent started): events
        may have been missed, so every record held is read again (concurrently, each bounded)."""
        self._live = False
        self._epoch += 1
        keys = self.keys()
        if keys:
            log.info("re-reading %d service accounts after a gap in the service-account watch", len(keys))
            await asyncio.gather(*(self.refresh(*key) for key in keys))

    # -- reads -------------------------------------------------------------------------------------

    async def _read(self, key: _Key) -> ServiceAccountRecord:
        """One GET; stored (or the failure recorded) in the same step as it is checked against the
        events that arrived meanwhile, so no event can slip in between."""
        self._racing[key] = _UNSEEN
        epoch = self._epoch  # a read begun before a relist may predate what the new watch replays
        try:
            record = await self._kube.get_service_account(*key, annotation=self.annotation,
                                                          timeout_s=READ_TIMEOUT_S)
        except UpstreamError as exc:
            raced = self._racing.pop(key, _UNSEEN)
            if isinstance(raced, ServiceAccountRecord):
                record = raced
            else:
                return self._on_failure(key, exc if raced is _UNSEEN else _deleted(key))
        else:
            raced = self._racing.pop(key, _UNSEEN)
            if raced is None:
                return self._on_failure(key, _deleted(key))
            if isinstance(raced, ServiceAccountRecord):
                record = raced
        self._store(key, record, epoch=epoch)
        return record

    def _on_failure(self, key: _Key, exc: UpstreamError) -> ServiceAccountRecord:
        entry = self._entries.get(key)
        if exc.status == 404 or entry is None:
            self._drop(key)
            raise exc
        entry.retry_at = self._clock.monotonic() + RETRY_S
        log.warning("cannot refresh service account %s/%s (%s); serving the last known record",
                    key[0], key[1], exc.reason)
        return entry.record

    def _drop(self, key: _Key) -> None:
        if self._entries.pop(key, None) is not None and self.on_change is not None:
            self.on_change(key)

    def _store(self, key: _Key, record: ServiceAccountRecord, *, epoch: int | None = None) -> None:
        previous = self._entries.get(key)
        self._entries[key] = _Entry(record=record, fetched_at=self._clock.monotonic(),
                                    epoch=self._epoch if epoch is None else epoch)
        if self.on_change is not None and (previous is None or previous.record != record):
            self.on_change(key)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class ServiceAccountWatcher(Reflector[ServiceAccountRecord]):
    """Keeps a ``ServiceAccountCache``'s records current: one cluster-wide watch (see the module)."""

    name = "service-account watch"

    def __init__(self, *, kube: KubeClient, cache: ServiceAccountCache, clock: Clock, synced: Gauge,
                 restarts: Counter) -> None:
        super().__init__(clock=clock, restarts=restarts)
        self._kube = kube
        self._cache = cache
        self._synced = synced

    async def _list(self) -> str:
        version = await self._kube.service_accounts_version()
        await self._cache.resynced()  # reads after ``version``: the watch replays anything newer
        self._synced.set(1)
        return version

    def _events(self, resource_version: str, timeout_s: int,
                opened: Callable[[], None]) -> AsyncGenerator[WatchEvent[ServiceAccountRecord], None]:
        return self._kube.watch_service_accounts(annotation=self._cache.annotation, resource_version=resource_version,
                                                 timeout_s=timeout_s, opened=opened)

    def _apply(self, event_type: str, item: ServiceAccountRecord) -> None:
        self._cache.apply(event_type, item)

    def _watch_opened(self) -> None:
        self._cache.watch_live(True)

    def _watch_closed(self) -> None:
        self._cache.watch_live(False)


def _deleted(key: _Key) -> UpstreamError:
    """The 404 a read would have got had it started after the deletion event that raced it."""
    return UpstreamError(service="k8s", url=f"serviceaccounts {key[0]}/{key[1]}", status=404, body="deleted",
                         retryable=False, message="the service account was deleted")
