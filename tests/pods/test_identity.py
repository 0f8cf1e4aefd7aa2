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
from metaemu.testing.fake_kubernetes import FakeKubernetes
from tests.helpers import sample
from tests.pods.support import GSA_ANNOTATION, NODE, NODE_IP, OTHER_NODE

GSA = "app@proj.iam.gserviceaccount.com"


@pytest.fixture
async def resolver(index: PodIndex, kube: KubeClient, service_accounts: ServiceAccountCache, clock: FakeClock,
                   pod_metrics: PodMetrics) -> AsyncIterator[IdentityResolver]:
    r = IdentityResolver(index=index, kube=kube, service_accounts=service_accounts, clock=clock, metrics=pod_metrics)
    yield r
    await r.aclose()


def place(fake: FakeKubernetes, index: PodIndex | None, name: str, ip: str, *, sa: str = "app",
          namespace: str = "apps", **kwargs: Any) -> dict[str, Any]:
    """A pod in the API and (unless ``index`` is None: not yet observed) in the index."""
    obj = fake.add_pod(namespace, name, node=kwargs.pop("node", NODE), ips=[ip], service_account=sa, **kwargs)
    if index is not None:
        index.upsert(parse_pod(obj))
    return obj


def observe(fake: FakeKubernetes, index: PodIndex, name: str, namespace: str = "apps") -> None:
    """The watch delivers the pod's current state."""
    index.upsert(parse_pod(fake.store.pods[(namespace, name)]))


async def drive(clock: FakeClock, call: Coroutine[Any, Any, PodIdentity | Refusal], *,
                step_s: float = 0.5, limit_s: float = 30) -> tuple[PodIdentity | Refusal, float]:
    """Run ``call`` while advancing virtual time in steps; returns its result and the time it took."""
    task = asyncio.ensure_future(call)
    started = clock.monotonic()
    while not task.done():
        await settle()
        if task.done():
            break
        assert clock.monotonic() - started < limit_s, "resolve did not finish"
        clock.advance(step_s)
    return task.result(), clock.monotonic() - started


def lookups(metrics: Metrics, result: str) -> float:
    return sample(metrics, "metaemu_pod_lookup_total", result=result)


# -- found -------------------------------------------------------------------------------------------


async def test_an_indexed_pod_resolves_to_its_own_identity(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, metrics: Metrics) -> None:
    fake.add_service_account("apps", "app", uid="ksa-uid", annotations={GSA_ANNOTATION: GSA})
    obj = place(fake, index, "web", "10.1.0.5")
    identity = await resolver.resolve("10.1.0.5")
    assert identity == PodIdentity(namespace="apps", pod_name="web", pod_uid=obj["metadata"]["uid"], ksa_name="app",
                                   ksa_uid="ksa-uid", gsa_email=GSA)
    assert identity.email("proj") == GSA
    assert identity.subject == "system:serviceaccount:apps:app"
    assert lookups(metrics, "found") == 1
    assert fake.calls["list"] == 0  # an index hit costs no pod lookup


async def test_an_unannotated_service_account_has_the_identity_namespace_as_email(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver) -> None:
    place(fake, index, "web", "10.1.0.5")
    identity = await resolver.resolve("10.1.0.5")
    assert isinstance(identity, PodIdentity)
    assert identity.gsa_email is None
    assert identity.email("proj") == "proj.svc.id.goog"


async def test_an_ipv4_mapped_peer_address_resolves_like_the_plain_one(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver) -> None:
    place(fake, index, "web", "10.1.0.5")
    identity = await resolver.resolve("::ffff:10.1.0.5")
    assert isinstance(identity, PodIdentity)
    assert identity.pod_name == "web"


# -- SEC-08 unknown address --------------------------------------------------------------------------


async def test_sec08_unknown_ip_gets_403_and_no_identity(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock, metrics: Metrics) -> None:
    place(fake, index, "web", "10.1.0.5")
    result, took = await drive(clock, resolver.resolve("10.1.0.99"))
    assert result == Refusal(status=403, reason="not_found", message=result.message)  # type: ignore[union-attr]
    assert took <= LIVE_LOOKUP_TIMEOUT_S + NEW_POD_WAIT_S
    assert lookups(metrics, "not_found") == 1
    assert lookups(metrics, "found") == 0
    live = [r for r in fake.requests if r.endpoint == "list"]
    assert [r.query["fieldSelector"] for r in live] == [f"status.podIP=10.1.0.99,spec.nodeName={NODE}"]
    assert fake.token_requests == []


async def test_a_garbage_peer_address_is_refused(resolver: IdentityResolver, metrics: Metrics) -> None:
    result = await resolver.resolve("not-an-ip")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "invalid_peer")


async def test_sec08_concurrent_requests_from_an_unknown_ip_share_one_live_lookup(
        fake: FakeKubernetes, resolver: IdentityResolver, clock: FakeClock) -> None:
    gate = fake.stall("list")
    tasks = [asyncio.ensure_future(resolver.resolve("10.1.0.99")) for _ in range(20)]
    await settle()
    gate.set()
    results = [r for r, _ in [await drive(clock, _done(t)) for t in tasks]]
    assert {(r.status, r.reason) for r in results if isinstance(r, Refusal)} == {(403, "not_found")}
    assert fake.calls["list"] == 1


async def _done(task: asyncio.Future[PodIdentity | Refusal]) -> PodIdentity | Refusal:
    return await task


# -- SEC-09 brand-new pod ----------------------------------------------------------------------------


async def test_sec09_brand_new_pod_gets_its_own_identity_once_indexed(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock, metrics: Metrics) -> None:
    place(fake, index, "neighbour", "10.1.0.6", sa="other")
    place(fake, None, "new", "10.1.0.5")  # in the API, not yet delivered by the watch
    pending = asyncio.ensure_future(resolver.resolve("10.1.0.5"))
    await settle()
    assert not pending.done()  # waiting, bounded, for the watch
    clock.advance(1)
    observe(fake, index, "new")
    identity = await pending
    assert isinstance(identity, PodIdentity)
    assert (identity.pod_name, identity.ksa_name) == ("new", "app")
    assert lookups(metrics, "found") == 1


async def test_sec09_brand_new_pod_not_indexed_in_time_gets_503_with_retry_after(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock, metrics: Metrics) -> None:
    place(fake, index, "neighbour", "10.1.0.6", sa="other")
    place(fake, None, "new", "10.1.0.5")
    result, took = await drive(clock, resolver.resolve("10.1.0.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason, result.retry_after_s) == (503, "pending", 1)
    assert took <= 5  # SEC-09: bounded wait
    assert lookups(metrics, "api_fallback") == 1
    assert lookups(metrics, "found") == 0


# -- SEC-10 IP reuse ---------------------------------------------------------------------------------


async def test_sec10_ip_reuse_while_the_old_pod_is_terminating_is_refused(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(fake, index, "a", "10.1.0.5", sa="ksa-a")
    fake.delete_pod("apps", "a", grace_period_s=30)
    observe(fake, index, "a")  # terminating, still cached
    result, _ = await drive(clock, resolver.resolve("10.1.0.5"))  # B not created yet: nobody owns the IP
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "not_found")
    place(fake, None, "b", "10.1.0.5", sa="ksa-b")  # B takes the IP; the watch has not delivered it
    result, _ = await drive(clock, resolver.resolve("10.1.0.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (503, "pending")


async def test_sec10_ip_reuse_once_the_new_pod_is_observed_gets_the_new_identity(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver) -> None:
    place(fake, index, "a", "10.1.0.5", sa="ksa-a")
    fake.delete_pod("apps", "a", grace_period_s=30)
    observe(fake, index, "a")
    b = place(fake, index, "b", "10.1.0.5", sa="ksa-b")
    identity = await resolver.resolve("10.1.0.5")
    assert isinstance(identity, PodIdentity)
    assert (identity.pod_uid, identity.ksa_name) == (b["metadata"]["uid"], "ksa-b")
    terminating = fake.store.pods[("apps", "a")]
    fake.delete_pod("apps", "a")
    index.remove(parse_pod(terminating))
    assert await resolver.resolve("10.1.0.5") == identity


async def test_sec10_ip_reuse_before_the_deletion_is_observed_is_refused_as_ambiguous(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver) -> None:
    place(fake, index, "a", "10.1.0.5", sa="ksa-a")
    fake.delete_pod("apps", "a")  # deleted in the API; the watch has not said so yet
    place(fake, index, "b", "10.1.0.5", sa="ksa-b")
    result = await resolver.resolve("10.1.0.5")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (503, "ambiguous")


async def test_sec10_a_pod_replaced_while_its_service_account_is_read_is_not_served(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver) -> None:
    place(fake, index, "a", "10.1.0.5", sa="ksa-a")
    gate = fake.stall("get")
    pending = asyncio.ensure_future(resolver.resolve("10.1.0.5"))
    await settle()
    fake.delete_pod("apps", "a", grace_period_s=30)
    observe(fake, index, "a")
    gate.set()
    result = await pending
    assert isinstance(result, Refusal)
    assert result.status == 503


# -- SEC-11 ambiguity --------------------------------------------------------------------------------


async def test_sec11_two_candidates_for_one_ip_get_503_never_a_guess(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, metrics: Metrics) -> None:
    place(fake, index, "one", "10.1.0.5", sa="ksa-1")
    place(fake, index, "two", "10.1.0.5", sa="ksa-2")
    for _ in range(3):
        result = await resolver.resolve("10.1.0.5")
        assert isinstance(result, Refusal)
        assert (result.status, result.reason, result.retry_after_s) == (503, "ambiguous", 5)
    assert lookups(metrics, "ambiguous") == 3
    assert fake.calls["get"] == 0  # not even the service accounts were looked at


# -- SEC-12 terminal pods ----------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
async def test_sec12_terminal_pods_get_no_identity(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock, phase: str) -> None:
    place(fake, index, "job", "10.1.0.5", phase=phase)
    result, _ = await drive(clock, resolver.resolve("10.1.0.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "not_found")


async def test_sec12_a_terminating_pod_gets_no_identity(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(fake, index, "web", "10.1.0.5")
    fake.delete_pod("apps", "web", grace_period_s=30)
    observe(fake, index, "web")
    result, _ = await drive(clock, resolver.resolve("10.1.0.5"))
    assert isinstance(result, Refusal)
    assert result.status == 403


# -- SEC-13 other nodes ------------------------------------------------------------------------------


async def test_sec13_a_pod_of_another_node_is_rejected(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(fake, index, "far", "10.2.0.5", node=OTHER_NODE)  # even if it were offered to the index
    result, _ = await drive(clock, resolver.resolve("10.2.0.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "not_found")
    assert fake.requests[-1].query["fieldSelector"].endswith(f"spec.nodeName={NODE}")


# -- SEC-14 hostNetwork ------------------------------------------------------------------------------


@pytest.mark.parametrize("peer", [NODE_IP, "127.0.0.1", "::1", "::ffff:127.0.0.1"])
async def test_sec14_the_nodes_own_addresses_get_403(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, metrics: Metrics, peer: str) -> None:
    place(fake, index, "squatter", NODE_IP)  # a candidate claiming the node IP changes nothing
    result = await resolver.resolve(peer)
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "host_network")
    assert lookups(metrics, "host_network") == 1
    assert fake.calls["list"] == 0


async def test_sec14_a_host_network_pod_gets_403(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, metrics: Metrics) -> None:
    place(fake, index, "ds", "10.0.0.11", host_network=True)
    result = await resolver.resolve("10.0.0.11")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "host_network")


async def test_sec14_a_host_network_pod_seen_only_by_the_live_lookup_gets_403(
        fake: FakeKubernetes, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(fake, None, "ds", "10.0.0.12", host_network=True)
    result, _ = await drive(clock, resolver.resolve("10.0.0.12"))
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
    {"X-Forwarded-For": "10.1.0.6"}, {"X-Real-IP": "10.1.0.6"}, {"Forwarded": "for=10.1.0.6"},
    {"podname": "other", "podns": "apps"}, {"X-Client-IP": "10.1.0.6"}, {},
])
async def test_sec15_headers_and_query_parameters_never_change_the_identity(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, headers: dict[str, str]) -> None:
    place(fake, index, "caller", "10.1.0.5", sa="caller")
    place(fake, index, "victim", "10.1.0.6", sa="victim")
    request = make_mocked_request("GET", "/computeMetadata/v1/instance/service-accounts/default/token?ip=10.1.0.6",
                                  headers=headers, transport=_Transport(("10.1.0.5", 40000)))
    spoofed = request.clone(remote="10.1.0.6")  # what a forwarded-header middleware would do
    assert peer_ip_of(request) == peer_ip_of(spoofed) == "10.1.0.5"
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
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    fake.add_service_account("apps", "app", annotations={GSA_ANNOTATION: GSA})
    place(fake, index, "web", "10.1.0.5")
    before = await resolver.resolve("10.1.0.5")
    fake.annotate_sa("apps", "app", GSA_ANNOTATION, "moved@proj.iam.gserviceaccount.com")
    clock.advance(TTL_S)
    after = await resolver.resolve("10.1.0.5")
    assert isinstance(before, PodIdentity)
    assert isinstance(after, PodIdentity)
    assert after.gsa_email == "moved@proj.iam.gserviceaccount.com"
    assert after.access_key(["s"]) != before.access_key(["s"])


async def test_sec26_two_ksas_mapped_to_one_gsa_resolve_to_different_keys(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver) -> None:
    for name in ("one", "two"):
        fake.add_service_account("apps", name, annotations={GSA_ANNOTATION: GSA})
    place(fake, index, "p1", "10.1.0.5", sa="one")
    place(fake, index, "p2", "10.1.0.6", sa="two")
    first, second = await resolver.resolve("10.1.0.5"), await resolver.resolve("10.1.0.6")
    assert isinstance(first, PodIdentity)
    assert isinstance(second, PodIdentity)
    assert first.gsa_email == second.gsa_email
    assert first.access_key(["s"]) != second.access_key(["s"])


# -- service accounts and outages --------------------------------------------------------------------


async def test_a_pod_whose_service_account_is_gone_gets_403(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver) -> None:
    place(fake, index, "web", "10.1.0.5")
    fake.delete_service_account("apps", "app")
    result = await resolver.resolve("10.1.0.5")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (403, "service_account_not_found")


async def test_sec36_known_pods_keep_resolving_during_an_api_outage(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(fake, index, "web", "10.1.0.5")
    known = await resolver.resolve("10.1.0.5")
    fake.outage()
    clock.advance(TTL_S * 20)
    assert await resolver.resolve("10.1.0.5") == known


async def test_sec36_unseen_pods_get_503_during_an_api_outage(
        fake: FakeKubernetes, resolver: IdentityResolver, clock: FakeClock, metrics: Metrics) -> None:
    fake.outage()
    result, _ = await drive(clock, resolver.resolve("10.1.0.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason, result.retry_after_s) == (503, "api_unavailable", 5)
    assert lookups(metrics, "api_fallback") == 1


async def test_sec36_a_stalled_api_answers_within_the_bound(
        fake: FakeKubernetes, resolver: IdentityResolver, clock: FakeClock) -> None:
    fake.stall("list")
    result, took = await drive(clock, resolver.resolve("10.1.0.5"))
    assert isinstance(result, Refusal)
    assert result.status == 503
    assert took <= LIVE_LOOKUP_TIMEOUT_S + 0.5
    fake.unstall("list")


async def test_sec36_a_known_pod_whose_service_account_was_never_read_gets_503(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver) -> None:
    place(fake, index, "web", "10.1.0.5")
    fake.outage("error")
    result = await resolver.resolve("10.1.0.5")
    assert isinstance(result, Refusal)
    assert (result.status, result.reason) == (503, "api_unavailable")


async def test_sec09_a_stalled_service_account_read_is_bounded(
        fake: FakeKubernetes, index: PodIndex, resolver: IdentityResolver, clock: FakeClock) -> None:
    place(fake, index, "web", "10.1.0.5")
    fake.stall("get")
    result, took = await drive(clock, resolver.resolve("10.1.0.5"))
    assert isinstance(result, Refusal)
    assert (result.status, result.reason, result.retry_after_s) == (503, "api_unavailable", 5)
    assert took <= READ_TIMEOUT_S + 0.5
    fake.unstall("get")
