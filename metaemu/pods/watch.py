"""The node's pod index and the list + watch that keeps it current.

``PodIndex`` holds this node's pods only (SEC-13, SEC-39) and answers "which pods may own this
address": candidates per security.md recommendation 2 (``PodRecord.is_candidate_on``), indexed by
every entry of ``status.podIPs``. It also knows the node's own addresses (configured, loopback, and
those of hostNetwork pods, SEC-14), and wakes requests waiting for a brand-new pod (SEC-09).

``PodWatcher.pod_watcher`` is the long-running coroutine (one named task owned by the app, the
loop is ``reflector.Reflector``): list ``spec.nodeName=NODE`` → replace the index → watch from the
list's resourceVersion with bookmarks → apply each event; relist on 410 Gone; back off on errors.
During an API outage the index keeps its last state (SEC-36): known pods stay known, nothing is
guessed for new addresses.

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
import logging
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import TypeVar

from metaemu.clock import Clock
from metaemu.errors import ConfigError
from metaemu.pods.kube_client import KubeClient, WatchEvent
from metaemu.pods.objects import PodRecord, is_loopback, normalize_ip
from metaemu.pods.pod_metrics import PodMetrics
from metaemu.pods.reflector import WATCH_GRACE_S, WATCH_TIMEOUT_S, Reflector

__all__ = ["WATCH_GRACE_S", "WATCH_TIMEOUT_S", "PodIndex", "PodWatcher"]

log = logging.getLogger(__name__)

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
        self._unaddressed: set[_UID] = set()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        #: Called with each address whose pods changed (added, changed, removed, relisted).
        self.on_change: Callable[[str], None] | None = None
        #: Called with (pod, True) when a pod becomes a candidate (indexed with its address) or its
        #: addresses change, and (pod, False) once a pod that was a candidate no longer is.
        self.on_candidate: Callable[[PodRecord, bool], None] | None = None

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

    def awaiting_addresses(self) -> bool:
        """Whether a pod of this node is starting but has no address in the API yet: a caller the
        index does not know may be it (SEC-09), so it is worth waiting for the watch."""
        return bool(self._unaddressed)

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
            self._report(self._drop(uid), None)
        for pod in incoming.values():
            self.upsert(pod)

    def upsert(self, pod: PodRecord) -> None:
        """Add or replace ``pod``. A pod of another node is dropped, never kept (SEC-13, SEC-39)."""
        old = self._drop(pod.uid)
        if pod.node_name != self.node_name:
            log.warning("ignoring pod %s/%s of another node in the node-scoped watch", pod.namespace, pod.name)
            self._report(old, None)
            return
        self._pods[pod.uid] = pod
        if pod.host_network:
            for ip in pod.pod_ips:
                self._host_ips.setdefault(ip, set()).add(pod.uid)
        elif pod.is_candidate_on(self.node_name):
            for ip in pod.pod_ips:
                self._by_ip.setdefault(ip, set()).add(pod.uid)
            self._by_sa.setdefault((pod.namespace, pod.service_account), set()).add(pod.uid)
        elif pod.awaits_address_on(self.node_name):
            self._unaddressed.add(pod.uid)
        self._notify(pod.pod_ips)
        self._report(old, pod)

    def remove(self, pod: PodRecord) -> None:
        self._report(self._drop(pod.uid), None)

    def _drop(self, uid: str) -> PodRecord | None:
        old = self._pods.pop(uid, None)
        if old is None:
            return None
        for ip in old.pod_ips:
            _discard(self._by_ip, ip, uid)
            _discard(self._host_ips, ip, uid)
        _discard(self._by_sa, (old.namespace, old.service_account), uid)
        self._unaddressed.discard(uid)
        self._notify(old.pod_ips)
        return old

    def _report(self, old: PodRecord | None, new: PodRecord | None) -> None:
        if self.on_candidate is None:
            return
        if new is not None and new.is_candidate_on(self.node_name):
            # Only when it becomes one or its addresses change: kubelet's status updates are not news.
            if old is None or not old.is_candidate_on(self.node_name) or old.pod_ips != new.pod_ips:
                self.on_candidate(new, True)
        elif old is not None and old.is_candidate_on(self.node_name):
            self.on_candidate(old, False)

    def _notify(self, ips: Iterable[str]) -> None:
        for ip in ips:
            if self.on_change is not None:
                self.on_change(ip)
            for event in self._waiters.get(ip, ()):
                event.set()


class PodWatcher(Reflector[PodRecord]):
    """Keeps a ``PodIndex`` current from the API server (list + watch, relist on 410)."""

    name = "pod watch"

    def __init__(self, *, kube: KubeClient, index: PodIndex, clock: Clock, metrics: PodMetrics) -> None:
        super().__init__(clock=clock, restarts=metrics.watch_restarts)
        self._kube = kube
        self._index = index
        self._metrics = metrics
        self._selector = f"spec.nodeName={index.node_name}"

    async def pod_watcher(self) -> None:
        """Run until ``stop`` (or cancellation); see ``Reflector.run``."""
        await self.run()

    async def _list(self) -> str:
        listing = await self._kube.list_pods(field_selector=self._selector)
        self._index.replace(listing.pods)
        self._index.mark_synced()
        self._metrics.watch_synced.set(1)
        log.info("pod index synced: %d pods on node %s", len(self._index), self._index.node_name)
        return listing.resource_version

    def _events(self, resource_version: str, timeout_s: int,
                opened: Callable[[], None]) -> AsyncGenerator[WatchEvent[PodRecord], None]:
        return self._kube.watch_pods(field_selector=self._selector, resource_version=resource_version,
                                     timeout_s=timeout_s, opened=opened)

    def _apply(self, event_type: str, item: PodRecord) -> None:
        if event_type == "DELETED":
            self._index.remove(item)
        else:
            self._index.upsert(item)


def _discard(index: dict[_K, set[str]], key: _K, uid: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(uid)
        if not members:
            del index[key]
