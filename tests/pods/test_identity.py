"""Caller identification in node mode (security.md B: SEC-08..SEC-15; SEC-26 cache keys; SEC-36
outage): the pod index is the only source of identity, misses are settled by a bounded live lookup,
and nothing is ever guessed."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from metaemu.metrics import Metrics
from metaemu.pods.identity import (
    LIVE_LOOKUP_TIMEOUT_S,
    NEW_POD_WAIT_S,
    IdentityKey,
    IdentityResolver,
    PodIdentity,
    Refusal,
    peer_ip_of,
)
from metaemu.pods.kube_client import KubeClient
from metaemu.pods.objects import parse_pod
from metaemu.pods.pod_metrics import PodMetrics
from metaemu.pods.service_accounts import READ_TIMEOUT_S, TTL_S, ServiceAccountCache
from metaemu.pods.watch import PodIndex
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.kube_faults import FaultyKube
from tests.helpers import sample
from tests.kube.agent import unique
from tests.pods.support import GSA_ANNOTATION, HOST_IP, Pods

GSA = "app@proj.iam.gserviceaccount.com"


@pytest.fixture
async def resolver(index: PodIndex, kube: KubeClient, service_accounts: ServiceAccountCache, clock: FakeClock,
                   pod_metrics: PodMetrics) -> AsyncIterator[IdentityResolver]:
    r = IdentityResolver(index=index, kube=kube, service_accounts=service_accounts, clock=clock, metrics=pod_metrics)
    yield r
    await r.aclose()


def place(pods: Pods, index: PodIndex | None, name: str, ip: str, *, sa: str = "app",
          **kwargs: Any) -> dict[str, Any]:
    """A pod in the API and (unless ``index`` is None: not yet observed) in the index. The index is
    fed by the test: these tests decide exactly what the watch has delivered when."""
    obj = pods.pod(name, ip, sa=sa, **kwargs)
    if index is not None:
        index.upsert(parse_pod(obj))
    return obj


def observe(pods: Pods, index: PodIndex, name: str) -> None:
    """The watch delivers the pod's current state."""
    index.upsert(parse_pod(pods.get_pod(name)))


async def drive(clock: FakeClock, faulty: FaultyKube, call: Coroutine[Any, Any, PodIdentity | Refusal], *,
                step_s: float = 0.5, limit_s: float = 30) -> tuple[PodIdentity | Refusal, float]:
    """Run ``call`` while advancing virtual time in steps, only while no call is on the wire (a real
    round trip takes no virtual time); returns its result and the virtual time it took."""
    task = asyncio.ensure_future(call)
    started = clock.monotonic()
    while True:
        await faulty.quiet()
        await settle()
        if task.done():
            break
        if faulty.in_flight:
            continue
        assert clock.monotonic() - started < limit_s, "resolve did not finish"
        clock.advance(step_s)
    return task.result(), clock.monotonic() - started


def lookups(metrics: Metrics, result: str) -> float:
    return sample(metrics, "metaemu_pod_lookup_total", result=result)


# -- found -------------------------------------------------------------------------------------------


async def test_an_indexed_pod_resolves_to_its_own_identity(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, metrics: Metrics) -> None:
    ksa_uid = pods.service_account("app", annotations={GSA_ANNOTATION: GSA})
    obj = place(pods, index, "web", "169.254.40.5")
    identity = await resolver.resolve("169.254.40.5")
    assert identity == PodIdentity(namespace=pods.namespace, pod_name="web", pod_uid=obj["metadata"]["uid"],
                                   ksa_name="app", ksa_uid=ksa_uid, gsa_email=GSA)
    assert identity.email("proj") == GSA
    assert identity.subject == f"system:serviceaccount:{pods.namespace}:app"
    assert lookups(metrics, "found") == 1
    assert faulty.calls["list"] == 0  # an index hit costs no pod lookup


async def test_an_unannotated_service_account_has_the_identity_namespace_as_email(
        pods: Pods, index: PodIndex, resolver: IdentityResolver) -> None:
    place(pods, index, "web", "169.254.40.5")
    identity = await resolver.resolve("169.254.40.5")
    assert isinstance(identity, PodIdentity)
    assert identity.gsa_email is None
    assert identity.email("proj") == "proj.svc.id.goog"


async def test_an_ipv4_mapped_peer_address_resolves_like_the_plain_one(
        pods: Pods, index: PodIndex, resolver: IdentityResolver) -> None:
    place(pods, index, "web", "169.254.40.5")
    identity = await resolver.resolve("::ffff:169.254.40.5")
    assert isinstance(identity, PodIdentity)
    assert identity.pod_name == "web"


# -- SEC-08 unknown address --------------------------------------------------------------------------


async def test_sec08_unknown_ip_gets_403_and_no_identity(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, clock: FakeClock,
        metrics: Metrics) -> None:
    place(pods, index, "web", "169.254.40.5")
    result, took = await drive(clock, faulty, resolver.resolve("169.254.40.99"))
    assert result == Refusal(status=403, reason="not_found", message=result.message)  # type: ignore[union-attr]
    assert took <= LIVE_LOOKUP_TIMEOUT_S + NEW_POD_WAIT_S
    assert lookups(metrics, "not_found") == 1
    assert lookups(metrics, "found") == 0
    live = [r for r in faulty.requests if r.endpoint == "list"]
    assert [r.query["fieldSelector"] for r in live] == [f"status.podIP=169.254.40.99,spec.nodeName={pods.node}"]
    assert faulty.calls["token"] == 0


async def test_a_garbage_peer_address_is_refused(resolver: IdentityResolver, metrics: Metrics) -> None:
    result = await resolver.resolve("not-an-ip")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "invalid_peer")


async def test_sec08_concurrent_requests_from_an_unknown_ip_share_one_live_lookup(
        faulty: FaultyKube, resolver: IdentityResolver, clock: FakeClock) -> None:
    gate = faulty.stall("list")
    tasks = [asyncio.ensure_future(resolver.resolve("169.254.40.99")) for _ in range(20)]
    await settle()
    gate.set()
    results = [r for r, _ in [await drive(clock, faulty, _done(t)) for t in tasks]]
    assert {(r.status, r.reason) for r in results if isinstance(r, Refusal)} == {(403, "not_found")}
    assert faulty.calls["list"] == 1


async def _done(task: asyncio.Future[PodIdentity | Refusal]) -> PodIdentity | Refusal:
    return await task


# -- SEC-09 brand-new pod ----------------------------------------------------------------------------


async def test_sec09_brand_new_pod_gets_its_own_identity_once_indexed(
        pods: Pods, index: PodIndex, resolver: IdentityResolver, clock: FakeClock, metrics: Metrics) -> None:
    place(pods, index, "neighbour", "169.254.40.6", sa="other")
    place(pods, None, "new", "169.254.40.5")  # in the API, not yet delivered by the watch
    pending = asyncio.ensure_future(resolver.resolve("169.254.40.5"))
    await settle()
    assert not pending.done()  # waiting, bounded, for the watch
    clock.advance(1)
    observe(pods, index, "new")
    identity = await pending
    assert isinstance(identity, PodIdentity)
    assert (identity.pod_name, identity.ksa_name) == ("new", "app")
    assert lookups(metrics, "found") == 1


async def test_sec09_brand_new_pod_not_indexed_in_time_gets_503_with_retry_after(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, clock: FakeClock,
        metrics: Metrics) -> None:
    place(pods, index, "neighbour", "169.254.40.6", sa="other")
    place(pods, None, "new", "169.254.40.5")
    result, took = await drive(clock, faulty, resolver.resolve("169.254.40.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason, result.retry_after_s) == (503, "pending", 1)
    assert took <= 5  # SEC-09: bounded wait
    assert lookups(metrics, "api_fallback") == 1
    assert lookups(metrics, "found") == 0


# -- SEC-10 IP reuse ---------------------------------------------------------------------------------


async def test_sec10_ip_reuse_while_the_old_pod_is_terminating_is_refused(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(pods, index, "a", "169.254.40.5", sa="ksa-a")
    pods.delete_pod("a", grace_period_s=30)
    observe(pods, index, "a")  # terminating, still cached
    result, _ = await drive(clock, faulty, resolver.resolve("169.254.40.5"))  # B not created yet: nobody owns the IP
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "not_found")
    place(pods, None, "b", "169.254.40.5", sa="ksa-b")  # B takes the IP; the watch has not delivered it
    result, _ = await drive(clock, faulty, resolver.resolve("169.254.40.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (503, "pending")


async def test_sec10_ip_reuse_once_the_new_pod_is_observed_gets_the_new_identity(
        pods: Pods, index: PodIndex, resolver: IdentityResolver) -> None:
    place(pods, index, "a", "169.254.40.5", sa="ksa-a")
    pods.delete_pod("a", grace_period_s=30)
    observe(pods, index, "a")
    b = place(pods, index, "b", "169.254.40.5", sa="ksa-b")
    identity = await resolver.resolve("169.254.40.5")
    assert isinstance(identity, PodIdentity)
    assert (identity.pod_uid, identity.ksa_name) == (b["metadata"]["uid"], "ksa-b")
    terminating = pods.get_pod("a")
    pods.delete_pod("a")
    index.remove(parse_pod(terminating))
    assert await resolver.resolve("169.254.40.5") == identity


async def test_sec10_ip_reuse_before_the_deletion_is_observed_is_refused_as_ambiguous(
        pods: Pods, index: PodIndex, resolver: IdentityResolver) -> None:
    place(pods, index, "a", "169.254.40.5", sa="ksa-a")
    pods.delete_pod("a")  # deleted in the API; the watch has not said so yet
    place(pods, index, "b", "169.254.40.5", sa="ksa-b")
    result = await resolver.resolve("169.254.40.5")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (503, "ambiguous")


async def test_sec10_a_pod_replaced_while_its_service_account_is_read_is_not_served(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver) -> None:
    place(pods, index, "a", "169.254.40.5", sa="ksa-a")
    gate = faulty.stall("get")
    pending = asyncio.ensure_future(resolver.resolve("169.254.40.5"))
    await settle()
    pods.delete_pod("a", grace_period_s=30)
    observe(pods, index, "a")
    gate.set()
    result = await pending
    assert isinstance(result, Refusal)
    assert result.status == 503


# -- SEC-11 ambiguity --------------------------------------------------------------------------------


async def test_sec11_two_candidates_for_one_ip_get_503_never_a_guess(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, metrics: Metrics) -> None:
    place(pods, index, "one", "169.254.40.5", sa="ksa-1")
    place(pods, index, "two", "169.254.40.5", sa="ksa-2")
    for _ in range(3):
        result = await resolver.resolve("169.254.40.5")
        assert isinstance(result, Refusal)
        assert (result.status, result.reason, result.retry_after_s) == (503, "ambiguous", 5)
    assert lookups(metrics, "ambiguous") == 3
    assert faulty.calls["get"] == 0  # not even the service accounts were looked at


# -- SEC-12 terminal pods ----------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
async def test_sec12_terminal_pods_get_no_identity(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, clock: FakeClock,
        phase: str) -> None:
    place(pods, index, "job", "169.254.40.5", phase=phase)
    result, _ = await drive(clock, faulty, resolver.resolve("169.254.40.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "not_found")


async def test_sec12_a_terminating_pod_gets_no_identity(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(pods, index, "web", "169.254.40.5")
    pods.delete_pod("web", grace_period_s=30)
    observe(pods, index, "web")
    result, _ = await drive(clock, faulty, resolver.resolve("169.254.40.5"))
    assert isinstance(result, Refusal)
    assert result.status == 403


# -- SEC-13 other nodes ------------------------------------------------------------------------------


async def test_sec13_a_pod_of_another_node_is_rejected(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    other = pods.cluster.node(unique("node"))["metadata"]["name"]
    place(pods, index, "far", "169.254.50.5", node=other)  # even if it were offered to the index
    result, _ = await drive(clock, faulty, resolver.resolve("169.254.50.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "not_found")
    assert faulty.requests[-1].query["fieldSelector"].endswith(f"spec.nodeName={pods.node}")


# -- SEC-14 hostNetwork ------------------------------------------------------------------------------


@pytest.mark.parametrize("peer", [HOST_IP, "127.0.0.1", "::1", "::ffff:127.0.0.1"])
async def test_sec14_the_nodes_own_addresses_get_403(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, metrics: Metrics,
        peer: str) -> None:
    place(pods, index, "squatter", HOST_IP)  # a candidate claiming the node IP changes nothing
    result = await resolver.resolve(peer)
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "host_network")
    assert lookups(metrics, "host_network") == 1
    assert faulty.calls["list"] == 0


async def test_sec14_a_host_network_pod_gets_403(
        pods: Pods, index: PodIndex, resolver: IdentityResolver, metrics: Metrics) -> None:
    place(pods, index, "ds", "169.254.29.11", host_network=True)
    result = await resolver.resolve("169.254.29.11")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "host_network")


async def test_sec14_a_host_network_pod_seen_only_by_the_live_lookup_gets_403(
        pods: Pods, faulty: FaultyKube, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(pods, None, "ds", "169.254.29.12", host_network=True)
    result, _ = await drive(clock, faulty, resolver.resolve("169.254.29.12"))
    assert isinstance(result, Refusal)
    assert result.reason == "host_network"


# -- SEC-15 headers never set identity ---------------------------------------------------------------


def test_sec15_resolve_takes_only_the_peer_address() -> None:
    assert list(inspect.signature(IdentityResolver.resolve).parameters) == ["self", "peer_ip"]


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


@pytest.mark.parametrize("headers", [
    {"X-Forwarded-For": "169.254.40.6"}, {"X-Real-IP": "169.254.40.6"}, {"Forwarded": "for=169.254.40.6"},
    {"podname": "other", "podns": "apps"}, {"X-Client-IP": "169.254.40.6"}, {},
])
async def test_sec15_headers_and_query_parameters_never_change_the_identity(
        pods: Pods, index: PodIndex, resolver: IdentityResolver, headers: dict[str, str]) -> None:
    place(pods, index, "caller", "169.254.40.5", sa="caller")
    place(pods, index, "victim", "169.254.40.6", sa="victim")
    request = make_mocked_request("GET", "/computeMetadata/v1/instance/service-accounts/default/token?ip=169.254.40.6",
                                  headers=headers, transport=_Transport(("169.254.40.5", 40000)))
    spoofed = request.clone(remote="169.254.40.6")  # what a forwarded-header middleware would do
    assert peer_ip_of(request) == peer_ip_of(spoofed) == "169.254.40.5"
    peer = peer_ip_of(spoofed)
    assert peer is not None
    identity = await resolver.resolve(peer)
    assert isinstance(identity, PodIdentity)
    assert identity.ksa_name == "caller"


def test_a_connection_without_an_ip_peer_has_no_peer_address() -> None:
    class UnixTransport(_Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return "/run/metaemu.sock" if name == "peername" else default

    assert peer_ip_of(make_mocked_request("GET", "/", transport=UnixTransport(("", 0)))) is None


# -- SEC-26 cache keys -------------------------------------------------------------------------------


def _identity(**changes: Any) -> PodIdentity:
    base = PodIdentity(namespace="apps", pod_name="web", pod_uid="pod-1", ksa_name="app", ksa_uid="ksa-1",
                       gsa_email=GSA)
    return dataclasses.replace(base, **changes)


def test_sec26_cache_keys_hold_every_input_to_identity_and_nothing_else() -> None:
    fields = {f.name for f in dataclasses.fields(IdentityKey)}
    assert fields == {"namespace", "ksa_name", "ksa_uid", "gsa_email", "scopes", "audience"}
    scopes = ["https://www.googleapis.com/auth/cloud-platform"]
    key = _identity().access_key(scopes)
    assert _identity(ksa_name="other").access_key(scopes) != key  # same GSA, other KSA
    assert _identity(namespace="other").access_key(scopes) != key
    assert _identity(ksa_uid="ksa-2").access_key(scopes) != key  # KSA deleted and recreated
    assert _identity(gsa_email="two@proj.iam.gserviceaccount.com").access_key(scopes) != key
    assert _identity(gsa_email=None).access_key(scopes) != key
    assert _identity().access_key(["https://www.googleapis.com/auth/devstorage.read_only"]) != key
    assert _identity().id_token_key("https://a.example") != _identity().id_token_key("https://b.example")
    assert _identity().id_token_key("https://a.example").principal == key.principal
    # Pods of one KSA share tokens (the cache is per identity, never per pod or IP).
    assert _identity(pod_name="web-2", pod_uid="pod-2").access_key(scopes) == key
    assert _identity().access_key([*scopes, *scopes]) == key


def test_an_identity_key_is_for_scopes_or_an_audience() -> None:
    with pytest.raises(ValueError, match="not both"):
        IdentityKey(namespace="a", ksa_name="b", ksa_uid="c", gsa_email=None, scopes=("s",), audience="x")


async def test_sec26_an_annotation_change_gives_a_new_key_within_the_ttl(
        pods: Pods, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    pods.service_account("app", annotations={GSA_ANNOTATION: GSA})
    place(pods, index, "web", "169.254.40.5")
    before = await resolver.resolve("169.254.40.5")
    pods.annotate_sa("app", GSA_ANNOTATION, "moved@proj.iam.gserviceaccount.com")
    clock.advance(TTL_S)
    after = await resolver.resolve("169.254.40.5")
    assert isinstance(before, PodIdentity)
    assert isinstance(after, PodIdentity)
    assert after.gsa_email == "moved@proj.iam.gserviceaccount.com"
    assert after.access_key(["s"]) != before.access_key(["s"])


async def test_sec26_two_ksas_mapped_to_one_gsa_resolve_to_different_keys(
        pods: Pods, index: PodIndex, resolver: IdentityResolver) -> None:
    for name in ("one", "two"):
        pods.service_account(name, annotations={GSA_ANNOTATION: GSA})
    place(pods, index, "p1", "169.254.40.5", sa="one")
    place(pods, index, "p2", "169.254.40.6", sa="two")
    first, second = await resolver.resolve("169.254.40.5"), await resolver.resolve("169.254.40.6")
    assert isinstance(first, PodIdentity)
    assert isinstance(second, PodIdentity)
    assert first.gsa_email == second.gsa_email
    assert first.access_key(["s"]) != second.access_key(["s"])


# -- service accounts and outages --------------------------------------------------------------------


async def test_a_pod_whose_service_account_is_gone_gets_403(
        pods: Pods, index: PodIndex, resolver: IdentityResolver) -> None:
    place(pods, index, "web", "169.254.40.5")
    pods.delete_service_account("app")
    result = await resolver.resolve("169.254.40.5")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "service_account_not_found")


async def test_sec36_known_pods_keep_resolving_during_an_api_outage(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(pods, index, "web", "169.254.40.5")
    known = await resolver.resolve("169.254.40.5")
    faulty.outage()
    clock.advance(TTL_S * 20)
    assert await resolver.resolve("169.254.40.5") == known


async def test_sec36_unseen_pods_get_503_during_an_api_outage(
        faulty: FaultyKube, resolver: IdentityResolver, clock: FakeClock, metrics: Metrics) -> None:
    faulty.outage()
    result, _ = await drive(clock, faulty, resolver.resolve("169.254.40.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason, result.retry_after_s) == (503, "api_unavailable", 5)
    assert lookups(metrics, "api_fallback") == 1


async def test_sec36_a_stalled_api_answers_within_the_bound(
        faulty: FaultyKube, resolver: IdentityResolver, clock: FakeClock) -> None:
    faulty.stall("list")
    result, took = await drive(clock, faulty, resolver.resolve("169.254.40.5"))
    assert isinstance(result, Refusal)
    assert result.status == 503
    assert took <= LIVE_LOOKUP_TIMEOUT_S + 0.5
    faulty.unstall("list")


async def test_sec36_a_known_pod_whose_service_account_was_never_read_gets_503(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver) -> None:
    place(pods, index, "web", "169.254.40.5")
    faulty.outage("error")
    result = await resolver.resolve("169.254.40.5")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (503, "api_unavailable")


async def test_sec09_a_stalled_service_account_read_is_bounded(
        pods: Pods, faulty: FaultyKube, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(pods, index, "web", "169.254.40.5")
    faulty.stall("get")
    result, took = await drive(clock, faulty, resolver.resolve("169.254.40.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason, result.retry_after_s) == (503, "api_unavailable", 5)
    assert took <= READ_TIMEOUT_S + 0.5
    faulty.unstall("get")
