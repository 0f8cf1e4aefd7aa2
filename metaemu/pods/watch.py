"""The node's pod index and the list + watch that keeps it current.

``PodIndex`` holds this node's pods only (SEC-13, SEC-39) and answers "which pods may own this
address": candidates per security.md recommendation 2 (``PodRecord.is_candidate_on``), indexed by
every entry of ``status.podIPs``. It also knows the node's own addresses (configured, loopback, and
those of hostNetwork pods, SEC-14), and wakes requests waiting for a brand-new pod (SEC-09).

``PodWatcher.pod_watcher`` is the long-running coroutine (one named task owned by the app): list
``spec.nodeName=NODE`` → replace the index → watch from the list's resourceVersion with bookmarks →
apply each event; relist on 410 Gone; back off on errors. During an API outage the index keeps its
last state (SEC-36): known pods stay known, nothing is guessed for new addresses.

``synced`` (and ``metaemu_pod_watch_synced``) turns true once a full list has completed and stays
true through reconnects and relists, during which the last state keeps serving: it is what
readiness reports (SEC-37), and liveness never looks at it (SEC-36).

Residual risk (documented, not solvable by IP mapping alone): between a pod's deletion in the API and
this watch delivering it, a new pod given the same IP would resolve to the old pod. The watch is
streamed (``stream``) to keep that window at event latency; once both pods are visible the address is
ambiguous and refused (SEC-10, SEC-11).

Not owned here: turning a candidate into an identity (``identity``); service accounts (``service_accounts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from metaemu.clock import Clock
from metaemu.errors import ConfigError, UpstreamError
from metaemu.pods.kube_client import KubeClient, WatchEvent
from metaemu.pods.objects import PodRecord, is_loopback, normalize_ip
from metaemu.pods.pod_metrics import PodMetrics

log = logging.getLogger(__name__)

#: Server-side watch duration. client-go's reflector picks 5 to 10 min; 5 min bounds how long a
#: silently broken connection (no RST through a NAT) can hide, at one reconnect per 5 min per node.
WATCH_TIMEOUT_S = 300
#: A watch still open this long after its timeoutSeconds is treated as stalled and dropped.
WATCH_GRACE_S = 30.0
#: A watch that ends sooner than this without delivering an event made no progress: back off
#: instead of reconnecting in a tight loop (a proxy closing every stream at once).
MIN_HEALTHY_WATCH_S = 1.0
#: Reconnect backoff, doubling from 1 s to 30 s (client-go's reflector: 800 ms to 30 s).
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0

_UID = str
_SaKey = tuple[str, str]
_K = TypeVar("_K", str, _SaKey)


class PodIndex:
    """This node's pods, by candidate address. One event loop; not thread-safe."""

    def __init__(self, *, node_name: str, host_addresses: Iterable[str] = ()) -> None:
        if not node_name or any(c in node_name for c in ",=! "):
            raise ConfigError("node.name", f"not a node name: {node_name!r}")
        self.node_name = node_name
        self._synced = asyncio.Event()
        self._configured_hosts = frozenset(ip for ip in map(normalize_ip, host_addresses) if ip is not None)
        self._pods: dict[_UID, PodRecord] = {}
        self._by_ip: dict[str, set[_UID]] = {}
        self._host_ips: dict[str, set[_UID]] = {}
        self._by_sa: dict[_SaKey, set[_UID]] = {}
        self._waiters: dict[str, set[asyncio.Event]] = {}
        #: Called with each address whose pods changed (added, changed, removed, relisted).
        self.on_change: Callable[[str], None] | None = None

    def __len__(self) -> int:
        return len(self._pods)

    @property
    def synced(self) -> bool:
        """True once a full list has been indexed; it never turns false again."""
        return self._synced.is_set()

    def mark_synced(self) -> None:
        self._synced.set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    # -- queries -----------------------------------------------------------------------------------

    def candidates(self, ip: str) -> tuple[PodRecord, ...]:
        """Pods that may own ``ip`` (normalised); more than one means the address is ambiguous."""
        return tuple(self._pods[uid] for uid in self._by_ip.get(ip, ()))

    def is_host_address(self, ip: str) -> bool:
        """Whether ``ip`` is the node's own: configured, loopback, or a hostNetwork pod's (SEC-14)."""
        return ip in self._configured_hosts or ip in self._host_ips or is_loopback(ip)

    def pod(self, uid: str) -> PodRecord | None:
        return self._pods.get(uid)

    def pods_of_service_account(self, namespace: str, name: str) -> tuple[PodRecord, ...]:
        """Candidate pods running as ``namespace/name``, ordered by name (stable)."""
        pods = (self._pods[uid] for uid in self._by_sa.get((namespace, name), ()))
        return tuple(sorted(pods, key=lambda p: (p.name, p.uid)))

    def service_accounts(self) -> frozenset[_SaKey]:
        """(namespace, name) of every service account with a candidate pod on this node."""
        return frozenset(self._by_sa)

    async def wait_for_candidates(self, ip: str, *, timeout_s: float, clock: Clock) -> tuple[PodRecord, ...]:
        """``candidates(ip)`` as soon as there are any, or the empty tuple after ``timeout_s``."""
        deadline = clock.monotonic() + timeout_s
        event = asyncio.Event()
        self._waiters.setdefault(ip, set()).add(event)
        try:
            while True:
                found, remaining = self.candidates(ip), deadline - clock.monotonic()
                if found or remaining <= 0:
                    return found
                event.clear()
                await clock.sleep(remaining, until=event)
        finally:
            waiters = self._waiters[ip]
            waiters.discard(event)
            if not waiters:
                del self._waiters[ip]

    # -- updates -----------------------------------------------------------------------------------

    def replace(self, pods: Iterable[PodRecord]) -> None:
        """Make the index exactly ``pods`` (a full list): pods missing from it are dropped."""
        incoming = {p.uid: p for p in pods if p.node_name == self.node_name}
        for uid in [uid for uid in self._pods if uid not in incoming]:
            self._drop(uid)
        for pod in incoming.values():
            self.upsert(pod)

    def upsert(self, pod: PodRecord) -> None:
        """Add or replace ``pod``. A pod of another node is dropped, never kept (SEC-13, SEC-39)."""
        self._drop(pod.uid)
        if pod.node_name != self.node_name:
            log.warning("ignoring pod %s/%s of another node in the node-scoped watch", pod.namespace, pod.name)
            return
        self._pods[pod.uid] = pod
        if pod.host_network:
            for ip in pod.pod_ips:
                self._host_ips.setdefault(ip, set()).add(pod.uid)
        elif pod.is_candidate_on(self.node_name):
            for ip in pod.pod_ips:
                self._by_ip.setdefault(ip, set()).add(pod.uid)
            self._by_sa.setdefault((pod.namespace, pod.service_account), set()).add(pod.uid)
        self._notify(pod.pod_ips)

    def remove(self, pod: PodRecord) -> None:
        self._drop(pod.uid)

    def _drop(self, uid: str) -> None:
        old = self._pods.pop(uid, None)
        if old is None:
            return
        for ip in old.pod_ips:
            _discard(self._by_ip, ip, uid)
            _discard(self._host_ips, ip, uid)
        _discard(self._by_sa, (old.namespace, old.service_account), uid)
        self._notify(old.pod_ips)

    def _notify(self, ips: Iterable[str]) -> None:
        for ip in ips:
            if self.on_change is not None:
                self.on_change(ip)
            for event in self._waiters.get(ip, ()):
                event.set()


class PodWatcher:
    """Keeps a ``PodIndex`` current from the API server (list + watch, relist on 410)."""

    def __init__(self, *, kube: KubeClient, index: PodIndex, clock: Clock, metrics: PodMetrics) -> None:
        self._kube = kube
        self._index = index
        self._clock = clock
        self._metrics = metrics
        self._selector = f"spec.nodeName={index.node_name}"
        self._resource_version = ""
        self._need_list = True
        self._progressed = False
        self._stop = asyncio.Event()
        self._watch_done: asyncio.Event | None = None

    @property
    def resource_version(self) -> str:
        return self._resource_version

    def stop(self) -> None:
        self._stop.set()
        if self._watch_done is not None:
            self._watch_done.set()

    async def pod_watcher(self) -> None:
        """Run until ``stop`` (or cancellation); an iteration's failure is logged, counted and
        retried with backoff, never fatal."""
        failures = 0
        while not self._stop.is_set():
            self._progressed = False
            relisting, expired = self._need_list, False
            try:
                await self._cycle()
            except UpstreamError as exc:
                expired = exc.status == 410
                self._note_failure(exc)
            except Exception:  # a bug in one iteration must not stop the index from updating
                log.exception("pod watch iteration failed")
                self._metrics.watch_restarts.labels("error").inc()
            if self._progressed or (expired and not relisting):
                failures = 0  # a healthy watch ended, or its history expired: go again at once
                continue
            failures += 1
            if not self._stop.is_set():
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (failures - 1))
                await self._clock.sleep(delay, until=self._stop)

    async def _cycle(self) -> None:
        if self._need_list:
            await self._relist()
        started = self._clock.monotonic()
        try:
            await self._watch_once()
        finally:
            if self._clock.monotonic() - started >= MIN_HEALTHY_WATCH_S:
                self._progressed = True

    async def _relist(self) -> None:
        listing = await self._kube.list_pods(field_selector=self._selector)
        self._index.replace(listing.pods)
        self._resource_version = listing.resource_version
        self._need_list = False
        self._index.mark_synced()
        self._metrics.watch_synced.set(1)
        log.info("pod index synced: %d pods on node %s", len(self._index), self._index.node_name)

    async def _watch_once(self) -> None:
        """One watch request, bounded on the injected clock so a stalled stream is noticed."""
        done = self._watch_done = asyncio.Event()
        task = asyncio.create_task(self._consume(), name="pod_watch_stream")
        task.add_done_callback(lambda _: done.set())
        try:
            if not await self._clock.sleep(WATCH_TIMEOUT_S + WATCH_GRACE_S, until=done):
                raise UpstreamError(service="k8s", url=self._selector, status=0, body="stalled", retryable=True,
                                    message=f"the pod watch stayed open past {WATCH_TIMEOUT_S}s")
            if task.done():  # else stop() ended the wait
                task.result()
        finally:
            self._watch_done = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _consume(self) -> None:
        events = self._kube.watch_pods(field_selector=self._selector, resource_version=self._resource_version,
                                       timeout_s=WATCH_TIMEOUT_S)
        async with contextlib.aclosing(events):
            async for event in events:
                self._apply(event)

    def _apply(self, event: WatchEvent) -> None:
        self._progressed = True
        if event.resource_version:
            self._resource_version = event.resource_version
        match event.type, event.pod:
            case ("ADDED" | "MODIFIED"), PodRecord() as pod:
                self._index.upsert(pod)
            case "DELETED", PodRecord() as pod:
                self._index.remove(pod)
            case "BOOKMARK", _:
                pass
            case _:
                log.warning("ignoring pod watch event of type %r", event.type)

    def _note_failure(self, exc: UpstreamError) -> None:
        if exc.status == 410:  # our resourceVersion left the server's history: start over
            self._need_list = True
            self._metrics.watch_restarts.labels("expired").inc()
            log.info("pod watch expired (410 Gone); relisting")
            return
        self._metrics.watch_restarts.labels("error").inc()
        log.warning("pod watch failed (%s); keeping the last known %d pods", exc.reason, len(self._index))


def _discard(index: dict[_K, set[str]], key: _K, uid: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(uid)
        if not members:
            del index[key]
