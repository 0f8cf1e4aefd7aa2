"""Node mode: every pod on this node served with its own Kubernetes service account's identity.

``NodeAgent`` owns the pod watch, the caller resolver and one ``CachedCredentials`` per principal
(namespace, KSA name and UID, Google service account: never an IP, SEC-26), each over a pipeline
whose subject token is a TokenRequest bound to a calling pod (SEC-25). Principals whose last pod
left the node are retired by ``principal_sweeper`` so their tokens stop being refreshed; memory is
bounded by LRU (SEC-39). It is the server's ``ContextProvider`` in node mode.

Credentials before the first request (issue #11): when the pod watch indexes a pod of this node with
its address, the agent starts its service account's exchange at once (``_prefetch``: single-flight
with everything else, so the pod's first request is served from memory or joins the exchange in
flight); a pod that goes first cancels what has not started. A service-account change arriving from
the watch retires the principals it no longer matches at once, so their tokens are never served
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from cachetools import LRUCache

from metaemu.cache.credentials import CachedCredentials
from metaemu.cache.refresher import Refresher
from metaemu.clock import Clock
from metaemu.config import Config, NodeConfig
from metaemu.credentials.impersonation import IamCredentialsClient
from metaemu.credentials.pipeline import Identity, Pipeline
from metaemu.credentials.sts import StsClient
from metaemu.credentials.tokens import AccessToken
from metaemu.errors import UpstreamError
from metaemu.interception import InterceptionRule
from metaemu.metrics import Metrics
from metaemu.node_setup import create_interception_metrics, interception_reconciler
from metaemu.pods.identity import IdentityKey, IdentityResolver, PodIdentity, Refusal, peer_ip_of
from metaemu.pods.kube_client import KubeClient, KubeConnection
from metaemu.pods.objects import PodRecord, normalize_ip
from metaemu.pods.pod_metrics import create_pod_metrics
from metaemu.pods.service_accounts import ServiceAccountCache, ServiceAccountWatcher
from metaemu.pods.startup_taint import create_startup_taint_metrics, startup_taint_clearer
from metaemu.pods.stream import KubeHttp, KubeTransport
from metaemu.pods.token_source import PodTokenSource
from metaemu.pods.watch import PodIndex, PodWatcher
from metaemu.server.context import RequestContext
from metaemu.server.fast_path import ContextAnswers
from metaemu.server.metadata_tree import Entry, build_tree, index_tree

log = logging.getLogger(__name__)

#: Service accounts with live credentials at once; GKE notes > 3000 KSAs strain its server (SEC-39).
MAX_PRINCIPALS = 4096
#: Rendered trees kept (one per Google account email served).
MAX_TREES = 1024
#: A served pod's service account is read again this long before its record is due (TTL 30 s).
ACCOUNT_PREFETCH_S = 5.0
#: Identified callers remembered for the fast path, by address (a node has at most a few hundred pods).
MAX_CALLERS = 4096
#: How often principals without a pod on the node are retired: within a minute, as annotation
#: changes must take effect (issue #4).
SWEEP_INTERVAL_S = 60.0


@dataclass(slots=True)
class _Principal:
    credentials: CachedCredentials
    source: PodTokenSource


@dataclass(slots=True, eq=False)
class _Caller:
    """A caller the full path identified, remembered for the fast path (issue #12) until its
    address's pods change (the pod watch drops it) or what it was built from no longer holds."""

    context: RequestContext
    identity: PodIdentity
    principal: _Principal
    principal_key: IdentityKey
    fast_answers: ContextAnswers | None = None
    fresh_until: float = float("-inf")  # monotonic: when its service-account record is next due
    checked: int = -1  # the second of the last full check


class NodeAgent:
    static: RequestContext | None = None

    def __init__(self, *, config: Config, clock: Clock, metrics: Metrics, refresher: Refresher, sts: StsClient,
                 iam: IamCredentialsClient, connection: KubeConnection,
                 kube_transport: Callable[[KubeHttp], KubeTransport] | None = None) -> None:
        """``kube_transport`` puts something in front of the API server connection (the tests'
        ``FaultyKube``); the agent still owns and closes the ``KubeHttp`` it is given."""
        assert config.node is not None
        self._config = config
        self._node: NodeConfig = config.node
        self._clock = clock
        self._metrics = metrics
        self._refresher = refresher
        self._sts = sts
        self._iam = iam
        self._http = KubeHttp(ssl_context=connection.ssl_context())
        transport: KubeTransport = kube_transport(self._http) if kube_transport else self._http
        self.kube = KubeClient(connection=connection, http=transport, stream=transport, clock=clock, metrics=metrics)
        pod_metrics = create_pod_metrics(metrics.registry)
        self.index = PodIndex(node_name=self._node.name, host_addresses=self._node.host_addresses)
        self._watcher = PodWatcher(kube=self.kube, index=self.index, clock=clock, metrics=pod_metrics)
        self._accounts = ServiceAccountCache(kube=self.kube, clock=clock,
                                             annotation=self._node.service_account_annotation)
        self._account_watcher = ServiceAccountWatcher(
            kube=self.kube, cache=self._accounts, clock=clock, synced=pod_metrics.account_watch_synced,
            restarts=pod_metrics.account_watch_restarts)
        self._resolver = IdentityResolver(index=self.index, kube=self.kube, service_accounts=self._accounts,
                                          clock=clock, metrics=pod_metrics)
        self._principals: LRUCache[IdentityKey, _Principal] = _RetiringCache(maxsize=MAX_PRINCIPALS)
        # A plain dict (oldest dropped past MAX_CALLERS): looked up on every fast request.
        self._callers: dict[str, _Caller] = {}
        self._pod_metrics = pod_metrics
        # IP reuse stays safe: any change to an address's pods forgets its caller at once.
        self.index.on_change = self._forget_caller
        self.index.on_candidate = self._candidate_changed
        self._accounts.on_change = self._account_changed
        self._account_reads: dict[tuple[str, str], asyncio.Task[None]] = {}
        #: Prefetches whose service-account read is still running, by pod UID (at most the node's pods).
        self._prefetches: dict[str, asyncio.Task[None]] = {}
        #: Exchanges the prefetches started, until they finish (``warm`` waits for them).
        self._exchanges: set[asyncio.Task[AccessToken]] = set()
        self._trees: LRUCache[str, Mapping[str, Entry]] = LRUCache(maxsize=MAX_TREES)
        self.default_index: Mapping[str, Entry] = index_tree(build_tree(config))
        self._stop = asyncio.Event()
        self._rule = _interception_rule(config)
        self._rule_metrics = create_interception_metrics(metrics.registry) if self._rule else None
        self._taint_metrics = create_startup_taint_metrics(metrics.registry) if self._node.startup_taint else None

    @property
    def accounts(self) -> ServiceAccountCache:
        return self._accounts

    def principal_keys(self) -> list[IdentityKey]:
        """The principals with live credentials now (oldest use first)."""
        return list(self._principals)

    def ready(self) -> str | None:
        """SEC-37: the pod watch has synced and, when the agent keeps the rules, they are in place."""
        if not self.index.synced:
            return "the pod watch has not synced yet"
        if self._rule is not None and self._metrics.registry.get_sample_value("metaemu_interception_rule_present") != 1:
            return "the interception rules are not in place"
        return None

    async def context_for(self, request: web.Request) -> RequestContext | Refusal:
        peer = peer_ip_of(request)  # SECURITY: the kernel's peer address, never a header (SEC-15)
        if peer is None:
            return Refusal(status=403, reason="not_found", message="The caller's address is unknown.")
        resolved = await self._resolver.resolve(peer)
        if isinstance(resolved, Refusal):
            return resolved
        principal = self._principal(resolved)
        context = RequestContext(index=self._tree(resolved.email(self._config.project_id)),
                                 credentials=principal.credentials, rate_key=resolved.pod_uid)
        ip = normalize_ip(peer)
        if ip is not None:  # no await since resolve() checked the address is still this pod's alone
            if len(self._callers) >= MAX_CALLERS and ip not in self._callers:
                del self._callers[next(iter(self._callers))]
            self._callers[ip] = _Caller(context=context, identity=resolved, principal=principal,
                                        principal_key=resolved.access_key(()).principal)
        return context

    def fast_caller(self, ip: str) -> _Caller | None:
        """The remembered caller at ``ip``, if its service account (as the full path would read it
        now, from memory) and principal are still the ones it was built from; counts nothing.

        Per request: the record's freshness as of the last check and the principal's retirement.
        Once a second (and whenever the record's freshness ran out): the full check against the
        service-account cache, which also keeps both LRU places as the full path's use would."""
        caller = self._callers.get(ip)
        if caller is None:
            return None
        now = self._clock.monotonic()
        if caller.principal.credentials.retired or (
                (now >= caller.fresh_until or int(now) != caller.checked) and not self._recheck(caller, now)):
            del self._callers[ip]  # the full path decides, and remembers again
            return None
        if now >= caller.fresh_until - ACCOUNT_PREFETCH_S:
            self._prefetch_account(caller)
        caller.principal.source.prefer(caller.identity)  # as _principal() does on every request
        return caller

    def _prefetch_account(self, caller: _Caller) -> None:
        """Re-read a served pod's service account shortly before its record is due, so the fast
        path never has to hand its connections to the full path for the read (they would stay
        there). A change it finds applies at once (``_account_changed``)."""
        key = (caller.identity.namespace, caller.identity.ksa_name)
        if key in self._account_reads or self._stop.is_set():
            return
        task = asyncio.create_task(self._accounts.refresh(*key), name="service_account_prefetch")
        self._account_reads[key] = task
        task.add_done_callback(lambda _: self._account_reads.pop(key, None))

    def _account_changed(self, key: tuple[str, str]) -> None:
        """A service account's record was replaced or dropped: its callers are checked again
        on their next request (and dropped if it no longer matches), and its principals that no
        longer match are retired now, so no token of the old Google account is served again."""
        for caller in self._callers.values():
            if (caller.identity.namespace, caller.identity.ksa_name) == key:
                caller.fresh_until = float("-inf")
        found = self._accounts.peek(*key)
        for principal_key in [k for k in self._principals if (k.namespace, k.ksa_name) == key]:
            if found is None or (found[0].uid, found[0].gsa_email) != (principal_key.ksa_uid, principal_key.gsa_email):
                self._principals.pop(principal_key, None)

    def _candidate_changed(self, pod: PodRecord, present: bool) -> None:
        """The pod watch indexed a candidate pod (start its credentials now) or dropped one."""
        if not present:
            task = self._prefetches.pop(pod.uid, None)
            if task is not None:
                task.cancel()
                self._pod_metrics.prefetches.labels("cancelled").inc()
            return
        if pod.uid in self._prefetches or self._stop.is_set():
            return
        task = asyncio.create_task(self._prefetch(pod), name="credential_prefetch")
        self._prefetches[pod.uid] = task
        task.add_done_callback(lambda done: self._prefetch_done(pod.uid, done))

    def _prefetch_done(self, uid: str, task: asyncio.Task[None]) -> None:
        if self._prefetches.get(uid) is task:
            del self._prefetches[uid]
        if not task.cancelled() and task.exception() is not None:
            log.error("credential prefetch failed", exc_info=task.exception())

    async def _prefetch(self, pod: PodRecord) -> None:
        """Read the pod's service account and start (or join) its default token's exchange; the
        exchange itself belongs to the token cache (it outlives this task and its pod)."""
        try:
            account = await self._accounts.get(pod.namespace, pod.service_account)
        except UpstreamError:  # the pod's own request will say why (403 or 503)
            self._pod_metrics.prefetches.labels("failed").inc()
            return
        current = self.index.pod(pod.uid)
        if current is None or not current.is_candidate_on(self.index.node_name):
            self._pod_metrics.prefetches.labels("cancelled").inc()
            return
        identity = PodIdentity(namespace=pod.namespace, pod_name=pod.name, pod_uid=pod.uid,
                               ksa_name=pod.service_account, ksa_uid=account.uid, gsa_email=account.gsa_email)
        credentials = self._principal(identity).credentials
        self._tree(identity.email(self._config.project_id))
        if credentials.access.peek(credentials.default_scopes) is not None:
            self._pod_metrics.prefetches.labels("cached").inc()
            return
        exchange = credentials.access.refresh(credentials.default_scopes)
        self._exchanges.add(exchange)
        exchange.add_done_callback(self._exchanges.discard)
        self._pod_metrics.prefetches.labels("started").inc()

    async def warm(self) -> None:
        """Return once the pod watch has synced and every pod of the node it has seen with an
        address has its default token cached or its exchange has ended (failed included): what a
        successor waits for before it takes connections (issue #11). Cancelling this cancels none
        of the work it waits for."""
        await self.index.wait_synced()
        while pending := {*self._prefetches.values(), *self._exchanges}:
            await asyncio.wait(pending)

    def _recheck(self, caller: _Caller, now: float) -> bool:
        identity = caller.identity
        found = self._accounts.peek(identity.namespace, identity.ksa_name)
        if found is None:
            return False
        account, caller.fresh_until = found
        if account.uid != identity.ksa_uid or account.gsa_email != identity.gsa_email:
            return False
        self._principals.get(caller.principal_key)
        caller.checked = int(now)
        return True

    def count_found(self) -> None:
        self._pod_metrics.lookup("found")

    def _forget_caller(self, ip: str) -> None:
        self._callers.pop(ip, None)

    def _principal(self, identity: PodIdentity) -> _Principal:
        key = identity.access_key(()).principal
        found = self._principals.get(key)
        if found is not None:
            found.source.prefer(identity)  # bind the next token to the latest calling pod
            return found
        source = PodTokenSource(kube=self.kube, index=self.index, identity=identity, audience=self._node.audience,
                                expiration_s=self._node.token_expiration_seconds, clock=self._clock)
        pipeline = Pipeline(identity=Identity(audience=self._node.audience, service_account=identity.gsa_email,
                                              default_scopes=self._node.scopes,
                                              lifetime_s=self._node.token_lifetime_seconds),
                            source=source, sts=self._sts, iam=self._iam)
        principal = _Principal(credentials=CachedCredentials(pipeline=pipeline, clock=self._clock,
                                                             metrics=self._metrics, refresher=self._refresher),
                               source=source)
        self._principals[key] = principal
        return principal

    def _tree(self, email: str) -> Mapping[str, Entry]:
        tree = self._trees.get(email)
        if tree is None:
            tree = self._trees[email] = index_tree(build_tree(self._config, email=email))
        return tree

    async def principal_sweeper(self) -> None:
        """Retire principals with no pod left on this node; runs until ``agent_ctx`` exits."""
        while not self._stop.is_set():
            await self._clock.sleep(SWEEP_INTERVAL_S, until=self._stop)
            try:
                for key in list(self._principals):
                    if not self.index.pods_of_service_account(key.namespace, key.ksa_name):
                        self._principals.pop(key, None)
            except Exception:  # one bad sweep must not end the loop
                log.exception("principal sweep failed")

    async def agent_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx entry: the pod watcher, the principal sweeper and, when configured, the
        interception reconciler and the startup-taint clearer, as named tasks."""
        tasks = [asyncio.create_task(self._watcher.pod_watcher(), name="pod_watcher"),
                 asyncio.create_task(self._account_watcher.run(), name="service_account_watcher"),
                 asyncio.create_task(self.principal_sweeper(), name="principal_sweeper")]
        if self._rule is not None and self._rule_metrics is not None:
            tasks.append(asyncio.create_task(interception_reconciler(
                self._rule, clock=self._clock, stop_event=self._stop, metrics=self._rule_metrics),
                name="interception_reconciler"))
        if self._taint_metrics is not None:  # SEC-02: only once ready() holds
            tasks.append(asyncio.create_task(startup_taint_clearer(
                self.kube, node=self._node.name, key=self._node.startup_taint, ready=self.ready, clock=self._clock,
                metrics=self._taint_metrics, stop_event=self._stop), name="startup_taint_clearer"))
        try:
            yield
        finally:
            self._stop.set()
            self._watcher.stop()
            self._account_watcher.stop()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for read in [*self._account_reads.values(), *self._prefetches.values()]:
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await read
            await self._resolver.aclose()
            await self._accounts.aclose()
            await self._http.close()


def _interception_rule(config: Config) -> InterceptionRule | None:
    node = config.node
    if node is None or not (node.intercept_pod_interfaces or node.intercept_node_interface):
        return None
    return InterceptionRule(target_address=config.listen.host, target_port=config.listen.port,
                            pod_interfaces=node.intercept_pod_interfaces,
                            node_interface=node.intercept_node_interface)


class _RetiringCache(LRUCache[IdentityKey, _Principal]):
    """Evicting or removing a principal stops its refreshes."""

    def popitem(self) -> tuple[IdentityKey, _Principal]:
        key, principal = super().popitem()
        principal.credentials.retire()
        return key, principal

    def pop(self, key: IdentityKey, default: object = None) -> _Principal | None:  # type: ignore[override]
        principal = super().pop(key, None)
        if principal is not None:
            principal.credentials.retire()
        return principal
