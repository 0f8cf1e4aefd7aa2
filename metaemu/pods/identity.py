"""Caller address → pod → Kubernetes service account → Google identity, failing closed (issue #4).

``IdentityResolver.resolve(peer_ip)`` is the only way node mode learns who is calling. Its one
input is the TCP peer address of the connection (``peer_ip_of``); headers and query parameters are
never inputs (SEC-15). Outcomes, each counted once in ``metaemu_pod_lookup_total{result}``:

    node's own address / hostNetwork pod        403  host_network   (SEC-14)
    exactly one candidate pod in the index      PodIdentity  found
    two or more candidates                      503  ambiguous      never a guess (SEC-11)
    no candidate: bounded live API lookup (``status.podIP`` + ``spec.nodeName``, one call shared
    by concurrent callers from the address), then:
        the API shows no candidate, the watch has synced and no pod of the node awaits its address
                                                403  not_found      at once (SEC-08, issue #11)
        else a bounded wait for the watch to index the pod:
        indexed in time                         PodIdentity  found  (SEC-09)
        the API shows a candidate not yet indexed, or the API cannot be asked
                                                503  api_fallback   Retry-After (SEC-09, SEC-36)
        the API shows no candidate              403  not_found      (SEC-08, SEC-10)

The wait that remains for an unknown address: while some pod of this node is starting and kubelet
has not yet posted its address (its containers may already be calling, GKE's "a few seconds"), an
unknown caller may be that pod, so it waits up to ``NEW_POD_WAIT_S`` for the watch to say so.

Identity is only ever taken from the watch-fed index, never from the live lookup: the lookup only
decides between "wait and retry" (503) and "unknown" (403). A pod whose service account no longer
exists gets 403; one whose service account cannot be read during an outage gets 503 unless a
record was read before (``service_accounts``).

``IdentityKey`` is what token caches key on (SEC-26): namespace, service-account name and UID,
Google service account, and the scopes or ID-token audience; never an IP or a pod.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from metaemu.clock import Clock
from metaemu.errors import UpstreamError
from metaemu.pods.kube_client import KubeClient
from metaemu.pods.objects import PodRecord, normalize_ip
from metaemu.pods.pod_metrics import LookupResult, PodMetrics
from metaemu.pods.service_accounts import ServiceAccountCache
from metaemu.pods.single_flight import SingleFlight
from metaemu.pods.watch import PodIndex

#: Bounds of the miss path; together within SEC-09's 5 s. The live lookup is one node-scoped list
#: (milliseconds when the API is healthy); the wait covers kubelet's status update reaching the
#: watch after the pod's containers have started (GKE: "a few seconds").
LIVE_LOOKUP_TIMEOUT_S = 2.0
NEW_POD_WAIT_S = 3.0
#: Retry-After for a pod the watch has not indexed yet: the next attempt usually succeeds.
RETRY_AFTER_PENDING_S = 1
#: Retry-After for an ambiguous address or an API outage: resolving either takes seconds at least.
RETRY_AFTER_UNAVAILABLE_S = 5

RefusalReason = Literal["invalid_peer", "host_network", "not_found", "ambiguous", "pending", "api_unavailable",
                        "service_account_not_found"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why no identity was resolved. ``message`` is safe for a response body and logs: it names
    no pod, address or token. ``retry_after_s`` is set exactly when ``status`` is 503."""

    status: int
    reason: RefusalReason
    message: str
    retry_after_s: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityKey:
    """A token-cache key (SEC-26). ``scopes`` (sorted, deduplicated) key access tokens,
    ``audience`` keys ID tokens; with neither it keys the federated token of the service account."""

    namespace: str
    ksa_name: str
    ksa_uid: str
    gsa_email: str | None
    scopes: tuple[str, ...] = ()
    audience: str | None = None

    def __post_init__(self) -> None:
        if self.scopes and self.audience is not None:
            raise ValueError("an IdentityKey is for scopes or for an ID-token audience, not both")
        object.__setattr__(self, "scopes", tuple(sorted(set(self.scopes))))

    @property
    def principal(self) -> IdentityKey:
        """The same service account and Google account without scopes or audience."""
        return IdentityKey(namespace=self.namespace, ksa_name=self.ksa_name, ksa_uid=self.ksa_uid,
                           gsa_email=self.gsa_email)


@dataclass(frozen=True, slots=True, kw_only=True)
class PodIdentity:
    """The calling pod and the identity it acts as."""

    namespace: str
    pod_name: str
    pod_uid: str
    ksa_name: str
    ksa_uid: str
    gsa_email: str | None

    @property
    def subject(self) -> str:
        """The Kubernetes token subject, ``system:serviceaccount:NS:NAME``."""
        return f"system:serviceaccount:{self.namespace}:{self.ksa_name}"

    def email(self, project_id: str) -> str:
        """What ``…/email`` shows, as GKE does: the annotated Google account, else the identity
        namespace ``PROJECT_ID.svc.id.goog``."""
        return self.gsa_email or f"{project_id}.svc.id.goog"

    def access_key(self, scopes: Iterable[str]) -> IdentityKey:
        return IdentityKey(namespace=self.namespace, ksa_name=self.ksa_name, ksa_uid=self.ksa_uid,
                           gsa_email=self.gsa_email, scopes=tuple(scopes))

    def id_token_key(self, audience: str) -> IdentityKey:
        return IdentityKey(namespace=self.namespace, ksa_name=self.ksa_name, ksa_uid=self.ksa_uid,
                           gsa_email=self.gsa_email, audience=audience)


def peer_ip_of(request: web.BaseRequest) -> str | None:
    """The TCP peer address of ``request``'s connection, as the kernel reported it (None when the
    connection is gone)."""
    # SECURITY: not ``request.remote``, which ``request.clone(remote=...)`` and forwarded-header
    # middlewares rewrite, and never a header (SEC-15; kiam ``--allow-ip-query``, NMI ``podns``).
    return transport_peer_ip(request.transport)


def transport_peer_ip(transport: asyncio.BaseTransport | None) -> str | None:
    """The peer address of a connection's transport, as the kernel reported it (None: gone)."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return None


class IdentityResolver:
    """Resolves callers against a ``PodIndex`` kept by ``PodWatcher``. One event loop."""

    def __init__(self, *, index: PodIndex, kube: KubeClient, service_accounts: ServiceAccountCache, clock: Clock,
                 metrics: PodMetrics, lookup_timeout_s: float = LIVE_LOOKUP_TIMEOUT_S,
                 new_pod_wait_s: float = NEW_POD_WAIT_S) -> None:
        self._index = index
        self._kube = kube
        self._service_accounts = service_accounts
        self._clock = clock
        self._metrics = metrics
        self._lookup_timeout_s = lookup_timeout_s
        self._new_pod_wait_s = new_pod_wait_s
        self._lookups: SingleFlight[str, tuple[PodRecord, ...]] = SingleFlight("live pod lookup")

    async def aclose(self) -> None:
        await self._lookups.aclose()

    async def resolve(self, peer_ip: str) -> PodIdentity | Refusal:
        """The identity of the pod at ``peer_ip`` (the connection's peer address), or why not.

        Waits at most ``lookup_timeout_s + new_pod_wait_s`` on a miss, plus a service-account read
        (bounded by ``service_accounts.READ_TIMEOUT_S``); a hit in the index costs no API call once
        its service account is cached.
        """
        ip = normalize_ip(peer_ip)
        if ip is None:
            return self._refuse("not_found", status=403, reason="invalid_peer",
                                message="The caller's address is not an IP address.")
        if self._index.is_host_address(ip):
            return self._host_network()
        found = self._index.candidates(ip)
        if found:
            return await self._settle(ip, found)
        return await self._miss(ip)

    async def _miss(self, ip: str) -> PodIdentity | Refusal:
        try:
            live = await self._lookups.run(ip, lambda: self._live_lookup(ip))
        except UpstreamError:
            return self._refuse("api_fallback", status=503, reason="api_unavailable", message="The Kubernetes API "
                                "cannot be reached to identify the caller; retry later.",
                                retry_after_s=RETRY_AFTER_UNAVAILABLE_S)
        if any(p.host_network for p in live):
            return self._host_network()
        expected = any(p.is_candidate_on(self._index.node_name) for p in live)
        if not expected and self._index.synced and not self._index.awaiting_addresses():
            # The API has no pod at this address on this node, and no pod of the node is waiting
            # for kubelet to post its address: nothing the watch could deliver would be this
            # caller, so the refusal needs no wait (issue #11).
            return self._refuse("not_found", status=403, reason="not_found",
                                message="No pod on this node has the caller's address.")
        found = await self._index.wait_for_candidates(ip, timeout_s=self._new_pod_wait_s, clock=self._clock)
        if found:
            return await self._settle(ip, found)
        if expected:
            return self._refuse("api_fallback", status=503, reason="pending", message="The calling pod is not yet "
                                "known to the metadata server; retry shortly.", retry_after_s=RETRY_AFTER_PENDING_S)
        return self._refuse("not_found", status=403, reason="not_found",
                            message="No pod on this node has the caller's address.")

    async def _live_lookup(self, ip: str) -> tuple[PodRecord, ...]:
        listing = await self._kube.list_pods(field_selector=f"status.podIP={ip},spec.nodeName={self._index.node_name}",
                                             timeout_s=self._lookup_timeout_s)
        return tuple(p for p in listing.pods if ip in p.pod_ips and p.node_name == self._index.node_name)

    async def _settle(self, ip: str, found: tuple[PodRecord, ...]) -> PodIdentity | Refusal:
        if len(found) > 1:
            return self._refuse("ambiguous", status=503, reason="ambiguous", message="More than one pod on this "
                                "node has the caller's address; refusing to guess.",
                                retry_after_s=RETRY_AFTER_UNAVAILABLE_S)
        self._metrics.lookup("found")
        pod = found[0]
        try:
            account = await self._service_accounts.get(pod.namespace, pod.service_account)
        except UpstreamError as exc:
            if exc.status == 404:
                return Refusal(status=403, reason="service_account_not_found",
                               message="The calling pod's Kubernetes service account does not exist.")
            return Refusal(status=503, reason="api_unavailable", retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
                           message="The caller's Kubernetes service account cannot be read; retry later.")
        # The read may have waited: the address must still belong to this pod alone (SEC-10).
        if tuple(p.uid for p in self._index.candidates(ip)) != (pod.uid,):
            return Refusal(status=503, reason="pending", retry_after_s=RETRY_AFTER_PENDING_S,
                           message="The caller's pod changed while it was being identified; retry shortly.")
        return PodIdentity(namespace=pod.namespace, pod_name=pod.name, pod_uid=pod.uid, ksa_name=pod.service_account,
                           ksa_uid=account.uid, gsa_email=account.gsa_email)

    def _host_network(self) -> Refusal:
        return self._refuse("host_network", status=403, reason="host_network", message="Requests from the node's "
                            "own network (host processes and hostNetwork pods) get no workload identity.")

    def _refuse(self, result: LookupResult, *, status: int,
                reason: RefusalReason, message: str, retry_after_s: int | None = None) -> Refusal:
        self._metrics.lookup(result)
        return Refusal(status=status, reason=reason, message=message, retry_after_s=retry_after_s)
