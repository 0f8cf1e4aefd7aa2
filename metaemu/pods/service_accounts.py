"""Service accounts of this node's pods: UID and Google-account annotation, cached with a short TTL.

Why a TTL and not a watch: a service-account watch cannot be node-scoped (service accounts have no
node), so every agent would hold every service account of the cluster (SEC-39: 5000 KSAs), while a
node only ever needs those of its own pods. Reading on demand with a 30 s TTL keeps memory
proportional to the node's pods and makes an annotation change visible within a minute (issue #4),
at one GET per service account in use per 30 s.

During an API outage a record that has expired is still served (SEC-36: pods seen before keep
working), and the API is asked again only every ``RETRY_S``. A 404 drops the record: a deleted
service account has no identity. Reads are single-flight per service account.

Not owned here: what the record is used for (``identity``).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from metaemu.clock import Clock
from metaemu.errors import UpstreamError
from metaemu.pods.kube_client import KubeClient
from metaemu.pods.objects import ServiceAccountRecord
from metaemu.pods.single_flight import SingleFlight

log = logging.getLogger(__name__)

#: The annotation GKE Workload Identity reads (issue #4 default).
DEFAULT_ANNOTATION = "iam.gke.io/gcp-service-account"
#: Annotation changes take effect within a minute (issue #4); 30 s leaves the other half for the
#: token cache, which keys on the annotation's value (SEC-26) and so picks it up on the next request.
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


@dataclass(slots=True)
class _Entry:
    record: ServiceAccountRecord
    fetched_at: float  # monotonic
    retry_at: float = float("-inf")  # monotonic; set after a failed refresh


class ServiceAccountCache:
    """``get(namespace, name)`` → ``ServiceAccountRecord``. One event loop; not thread-safe."""

    def __init__(self, *, kube: KubeClient, clock: Clock, annotation: str = DEFAULT_ANNOTATION,
                 ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES) -> None:
        self._kube = kube
        self._clock = clock
        self._annotation = annotation
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._reads: SingleFlight[_Key, ServiceAccountRecord] = SingleFlight("service account read")
        #: Called with (namespace, name) when a record is replaced by a different one or dropped.
        self.on_change: Callable[[_Key], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    async def aclose(self) -> None:
        await self._reads.aclose()

    async def get(self, namespace: str, name: str) -> ServiceAccountRecord:
        """The current record, at most ``ttl_s`` old while the API answers.

        Raises ``UpstreamError``: ``status == 404`` when the service account does not exist;
        otherwise (API unreachable, 5xx) only when no earlier record is known.
        """
        key = (namespace, name)
        now = self._clock.monotonic()
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            if now - entry.fetched_at < self._ttl_s or now < entry.retry_at:
                return entry.record
        try:
            record = await self._reads.run(key, lambda: self._kube.get_service_account(
                namespace, name, annotation=self._annotation, timeout_s=READ_TIMEOUT_S))
        except UpstreamError as exc:
            return self._on_failure(key, exc)
        self._store(key, record)
        return record

    async def refresh(self, namespace: str, name: str) -> None:
        """Read the record again now (single-flight with ``get``), as ``get`` does once it is due:
        the fast path calls this shortly before, so pods it serves never wait on the read."""
        key = (namespace, name)
        try:
            record = await self._reads.run(key, lambda: self._kube.get_service_account(
                namespace, name, annotation=self._annotation, timeout_s=READ_TIMEOUT_S))
        except UpstreamError as exc:
            with contextlib.suppress(UpstreamError):
                self._on_failure(key, exc)
            return
        self._store(key, record)

    def peek(self, namespace: str, name: str) -> tuple[ServiceAccountRecord, float] | None:
        """The record ``get`` would return from memory now (no API call) and the monotonic time
        until which it would keep returning it without asking the API (its TTL, or the retry
        point after a failed refresh); None when ``get`` would ask now."""
        key = (namespace, name)
        entry = self._entries.get(key)
        if entry is None:
            return None
        until = max(entry.fetched_at + self._ttl_s, entry.retry_at)
        if self._clock.monotonic() < until:
            self._entries.move_to_end(key)
            return entry.record, until
        return None

    def _on_failure(self, key: _Key, exc: UpstreamError) -> ServiceAccountRecord:
        entry = self._entries.get(key)
        if exc.status == 404 or entry is None:
            if self._entries.pop(key, None) is not None and self.on_change is not None:
                self.on_change(key)
            raise exc
        entry.retry_at = self._clock.monotonic() + RETRY_S
        log.warning("cannot refresh service account %s/%s (%s); serving the last known record",
                    key[0], key[1], exc.reason)
        return entry.record

    def _store(self, key: _Key, record: ServiceAccountRecord) -> None:
        previous = self._entries.get(key)
        self._entries[key] = _Entry(record=record, fetched_at=self._clock.monotonic())
        if self.on_change is not None and (previous is None or previous.record != record):
            self.on_change(key)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
