"""PodIndex and PodWatcher: the candidate rule (SEC-12..SEC-14), node scoping and bounded memory
(SEC-13, SEC-39), list + watch with bookmarks, relist on 410 Gone, outages (SEC-36); and the
service-account cache (annotation changes within the TTL, SEC-26; stale records during outages)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from metaemu.errors import UpstreamError
from metaemu.metrics import Metrics
from metaemu.pods.kube_client import KubeClient
from metaemu.pods.objects import PodRecord
from metaemu.pods.pod_metrics import PodMetrics
from metaemu.pods.service_accounts import MAX_ENTRIES, RETRY_S, TTL_S, ServiceAccountCache
from metaemu.pods.watch import WATCH_GRACE_S, WATCH_TIMEOUT_S, PodIndex, PodWatcher
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.kube_faults import FaultyKube, kube_status
from tests.helpers import sample
from tests.kube.agent import unique
from tests.pods.support import GSA_ANNOTATION, HOST_IP, Pods, advance, eventually

NODE, OTHER_NODE = "node-a", "node-b"


def record(name: str, ip: str, *, node: str = NODE, phase: str = "Running", deleting: bool = False,
           host_network: bool = False, sa: str = "app", uid: str | None = None, ips: tuple[str, ...] = ()) -> PodRecord:
    return PodRecord(namespace="apps", name=name, uid=uid or f"uid-{name}", node_name=node, service_account=sa,
                     host_network=host_network, phase=phase, deleting=deleting, pod_ips=ips or (ip,))


def names(pods: tuple[PodRecord, ...]) -> list[str]:
    return sorted(p.name for p in pods)


@pytest.fixture
def local_index() -> PodIndex:
    """An index fed by the test itself (no API server)."""
    return PodIndex(node_name=NODE, host_addresses=[HOST_IP])


# -- PodIndex ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_sec12_terminal_pods_are_never_candidates(local_index: PodIndex, phase: str) -> None:
    local_index.upsert(record("done", "10.1.0.5", phase=phase))
    assert local_index.candidates("10.1.0.5") == ()


def test_sec12_a_pod_with_a_deletion_timestamp_is_never_a_candidate(local_index: PodIndex) -> None:
    local_index.upsert(record("web", "10.1.0.5"))
    local_index.upsert(record("web", "10.1.0.5", deleting=True))
    assert local_index.candidates("10.1.0.5") == ()
    assert local_index.pods_of_service_account("apps", "app") == ()


def test_pending_pod_with_an_address_is_a_candidate(local_index: PodIndex) -> None:
    local_index.upsert(record("starting", "10.1.0.5", phase="Pending"))
    assert names(local_index.candidates("10.1.0.5")) == ["starting"]


def test_sec13_sec39_pods_of_other_nodes_are_not_kept(local_index: PodIndex) -> None:
    local_index.upsert(record("elsewhere", "10.2.0.5", node=OTHER_NODE))
    local_index.replace([record("mine", "10.1.0.5"), record("theirs", "10.2.0.6", node=OTHER_NODE)])
    assert len(local_index) == 1
    assert local_index.candidates("10.2.0.5") == local_index.candidates("10.2.0.6") == ()


def test_sec13_a_pod_moving_to_another_node_record_is_dropped(local_index: PodIndex) -> None:
    local_index.upsert(record("web", "10.1.0.5"))
    local_index.upsert(record("web", "10.1.0.5", node=OTHER_NODE))
    assert len(local_index) == 0


def test_sec14_host_network_pods_make_their_addresses_host_addresses(local_index: PodIndex) -> None:
    local_index.upsert(record("agent", "10.0.0.11", host_network=True))
    assert local_index.candidates("10.0.0.11") == ()
    assert local_index.is_host_address("10.0.0.11")
    assert local_index.is_host_address(HOST_IP)
    assert local_index.is_host_address("127.0.0.1")
    assert local_index.is_host_address("::1")
    assert not local_index.is_host_address("10.1.0.5")


def test_every_dual_stack_address_is_indexed(local_index: PodIndex) -> None:
    local_index.upsert(record("web", "10.1.0.5", ips=("10.1.0.5", "fd00::5")))
    assert names(local_index.candidates("10.1.0.5")) == names(local_index.candidates("fd00::5")) == ["web"]


def test_replace_drops_pods_missing_from_the_list(local_index: PodIndex) -> None:
    local_index.upsert(record("old", "10.1.0.5"))
    local_index.replace([record("new", "10.1.0.6")])
    assert local_index.candidates("10.1.0.5") == ()
    assert names(local_index.candidates("10.1.0.6")) == ["new"]


def test_index_tracks_service_accounts_with_running_pods(local_index: PodIndex) -> None:
    local_index.upsert(record("a", "10.1.0.5", sa="one"))
    local_index.upsert(record("b", "10.1.0.6", sa="two", phase="Succeeded"))
    assert local_index.service_accounts() == {("apps", "one")}


async def test_wait_for_candidates_wakes_when_the_pod_is_indexed(local_index: PodIndex, clock: FakeClock) -> None:
    waiting = asyncio.create_task(local_index.wait_for_candidates("10.1.0.5", timeout_s=3, clock=clock))
    await settle()
    local_index.upsert(record("web", "10.1.0.5"))
    assert names(await waiting) == ["web"]


async def test_wait_for_candidates_gives_up_after_its_timeout(local_index: PodIndex, clock: FakeClock) -> None:
    waiting = asyncio.create_task(local_index.wait_for_candidates("10.1.0.5", timeout_s=3, clock=clock))
    await clock.wait_for_sleepers(1)
    local_index.upsert(record("other", "10.1.0.6"))  # another address: not a reason to return
    await settle()
    assert not waiting.done()
    clock.advance(3)
    assert await waiting == ()


# -- PodWatcher (on the real API server) -------------------------------------------------------------


def mine(index: PodIndex) -> int:
    """Pods in the index besides the agent's own hostNetwork pod (it is on the node too)."""
    return len(index) - 1


async def test_lists_this_nodes_pods_then_applies_watch_events(
        pods: Pods, faulty: FaultyKube, index: PodIndex, watcher: PodWatcher, metrics: Metrics) -> None:
    pods.pod("web", "169.254.40.5")
    pods.pod("far", "169.254.40.6", node=pods.cluster.node(unique("node"))["metadata"]["name"])
    await eventually(lambda: index.synced)
    assert sample(metrics, "metaemu_pod_watch_synced") == 1
    assert faulty.requests[0].query["fieldSelector"] == f"spec.nodeName={pods.node}"
    assert mine(index) == 1 and names(index.candidates("169.254.40.5")) == ["web"]
    pods.pod("api", "169.254.40.7")
    await eventually(lambda: len(index.candidates("169.254.40.7")) == 1)
    pods.delete_pod("web", grace_period_s=30)
    await eventually(lambda: index.candidates("169.254.40.5") == ())
    pods.delete_pod("web")
    await eventually(lambda: mine(index) == 1)
    assert faulty.calls["list"] == 1


async def test_sec12_phase_changes_are_observed(pods: Pods, index: PodIndex, watcher: PodWatcher) -> None:
    pods.pod("job", "169.254.40.7")
    await eventually(lambda: len(index.candidates("169.254.40.7")) == 1)
    pods.set_phase("job", "Succeeded")
    await eventually(lambda: index.candidates("169.254.40.7") == ())


def bookmark(resource_version: str) -> bytes:
    """A BOOKMARK event as the API server writes it (an object with only its resourceVersion)."""
    return json.dumps({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {
        "resourceVersion": resource_version, "annotations": {"k8s.io/initial-events-end": "true"}}}}).encode()


async def test_bookmarks_advance_the_resource_version(pods: Pods, faulty: FaultyKube, index: PodIndex,
                                                      watcher: PodWatcher) -> None:
    await eventually(lambda: index.synced and faulty.watch_count == 1)
    assert faulty.requests[-1].query["allowWatchBookmarks"] == "true"
    # An unrelated write moves the cluster's resourceVersion with no pod event; the server would
    # say so in its next bookmark (about once a minute): deliver that bookmark now.
    rv = pods.cluster.ok("POST", "/api/v1/namespaces", {"metadata": {"name": unique("unrelated")}})["metadata"][
        "resourceVersion"]
    faulty.inject(bookmark(rv))
    await eventually(lambda: watcher.resource_version == rv)


async def test_reconnects_from_its_resource_version_when_the_watch_times_out(
        faulty: FaultyKube, index: PodIndex, watcher: PodWatcher, clock: FakeClock) -> None:
    await eventually(lambda: faulty.watch_count == 1)
    await advance(clock, faulty, WATCH_TIMEOUT_S)
    faulty.end_watches()  # the server's timeoutSeconds is up
    await eventually(lambda: faulty.calls["watch"] == 2 and faulty.watch_count == 1)
    assert faulty.requests[-1].query["resourceVersion"] == watcher.resource_version
    assert faulty.calls["list"] == 1


def expired(rv: str) -> bytes:
    """The ERROR event the API server streams for a resourceVersion older than its history."""
    return json.dumps({"type": "ERROR", "object": kube_status(
        410, "Expired", f"The resourceVersion for the provided watch is too old. ({rv})")}).encode()


async def test_relists_on_410_gone_and_catches_up_with_missed_changes(
        pods: Pods, faulty: FaultyKube, index: PodIndex, watcher: PodWatcher, clock: FakeClock,
        metrics: Metrics) -> None:
    pods.pod("gone-while-away", "169.254.40.5")
    await eventually(lambda: mine(index) == 1 and faulty.watch_count == 1)
    faulty.outage()  # the watcher loses the API ...
    pods.delete_pod("gone-while-away")  # ... changes happen ...
    pods.pod("new-while-away", "169.254.40.6")
    # ... and the history it would resume from is compacted away (tests/kube proves the real
    # server's 410 on a compacted etcd; here it comes on cue): the resumed watch gets a 410 event.
    faulty.restore()
    faulty.answer("watch", status_code=200, body=expired(watcher.resource_version))
    await advance(clock, faulty, 2)
    await eventually(lambda: faulty.calls["list"] == 2 and len(index.candidates("169.254.40.6")) == 1)
    assert index.candidates("169.254.40.5") == ()
    assert sample(metrics, "metaemu_pod_watch_restarts_total", reason="expired") == 1
    assert index.synced


async def test_relists_when_the_watch_request_itself_answers_410(
        faulty: FaultyKube, index: PodIndex, watcher: PodWatcher, clock: FakeClock) -> None:
    await eventually(lambda: faulty.watch_count == 1)
    faulty.fail("watch", status_code=410, reason="Expired")
    faulty.end_watches()
    await eventually(lambda: faulty.watch_count == 0)
    await advance(clock, faulty, 1)  # the empty, instant watch counted as no progress: one backoff step
    await eventually(lambda: faulty.calls["watch"] == 3 and faulty.calls["list"] == 2)  # 410, relist, watch


async def test_sec36_api_outage_keeps_the_last_known_pods(
        pods: Pods, faulty: FaultyKube, index: PodIndex, watcher: PodWatcher, clock: FakeClock,
        metrics: Metrics) -> None:
    pods.pod("web", "169.254.40.5")
    await eventually(lambda: mine(index) == 1)
    faulty.outage()
    for step in (1, 2, 4, 8, 16, 30, 30):  # the watcher backs off while the API is down
        await advance(clock, faulty, step)
    assert names(index.candidates("169.254.40.5")) == ["web"]
    assert index.synced
    assert sample(metrics, "metaemu_pod_watch_restarts_total", reason="error") >= 5
    pods.pod("api", "169.254.40.6")  # written while the watcher cannot see it
    faulty.restore()
    await advance(clock, faulty, 30)
    await eventually(lambda: len(index.candidates("169.254.40.6")) == 1)
    assert faulty.calls["list"] == 1  # the watch resumed from its resourceVersion: no relist needed


async def test_a_stalled_watch_is_abandoned_after_its_timeout(
        faulty: FaultyKube, index: PodIndex, watcher: PodWatcher, clock: FakeClock, metrics: Metrics) -> None:
    await eventually(lambda: faulty.watch_count == 1)
    faulty.stall("watch")
    faulty.end_watches()
    await eventually(lambda: faulty.watch_count == 0)
    await advance(clock, faulty, 1)  # backoff after the instant, empty watch
    await eventually(lambda: faulty.calls["watch"] == 2)
    await advance(clock, faulty, WATCH_TIMEOUT_S + WATCH_GRACE_S)
    await eventually(lambda: sample(metrics, "metaemu_pod_watch_restarts_total", reason="error") == 1)
    faulty.unstall("watch")


async def test_stop_ends_the_watcher(kube: KubeClient, faulty: FaultyKube, index: PodIndex, clock: FakeClock,
                                     pod_metrics: PodMetrics) -> None:
    watcher = PodWatcher(kube=kube, index=index, clock=clock, metrics=pod_metrics)
    task = asyncio.create_task(watcher.pod_watcher())
    await eventually(lambda: faulty.watch_count == 1)
    watcher.stop()
    await asyncio.wait_for(task, timeout=5)
    assert faulty.watch_count == 0


async def test_sec39_index_holds_only_this_nodes_pods_in_a_large_cluster(
        pods: Pods, index: PodIndex, watcher: PodWatcher) -> None:
    others = [pods.cluster.node(unique("node"))["metadata"]["name"] for _ in range(4)]
    with ThreadPoolExecutor(8) as pool:  # 250 pods on five nodes, through the real API
        list(pool.map(lambda n: pods.pod(f"pod-{n}", f"169.254.{41 + n // 250}.{1 + n % 250}", sa=f"ksa-{n % 5}",
                                         node=pods.node if n % 5 == 0 else others[n % 4]), range(250)))
    await eventually(lambda: index.synced and mine(index) == 50)
    assert all(len(index.candidates(f"169.254.{41 + n // 250}.{1 + n % 250}")) == (n % 5 == 0) for n in range(250))


# -- ServiceAccountCache (on the real API server) ----------------------------------------------------


async def test_annotation_change_is_seen_within_the_ttl(
        pods: Pods, service_accounts: ServiceAccountCache, clock: FakeClock) -> None:
    pods.service_account("app", annotations={GSA_ANNOTATION: "one@p.iam.gserviceaccount.com"})
    ns = pods.namespace
    assert (await service_accounts.get(ns, "app")).gsa_email == "one@p.iam.gserviceaccount.com"
    pods.annotate_sa("app", GSA_ANNOTATION, "two@p.iam.gserviceaccount.com")
    assert (await service_accounts.get(ns, "app")).gsa_email == "one@p.iam.gserviceaccount.com"  # cached
    clock.advance(TTL_S)
    assert (await service_accounts.get(ns, "app")).gsa_email == "two@p.iam.gserviceaccount.com"
    assert TTL_S < 60  # issue #4: within a minute
    pods.annotate_sa("app", GSA_ANNOTATION, None)
    clock.advance(TTL_S)
    assert (await service_accounts.get(ns, "app")).gsa_email is None


async def test_sec36_a_known_service_account_is_served_stale_during_an_outage(
        pods: Pods, faulty: FaultyKube, service_accounts: ServiceAccountCache, clock: FakeClock) -> None:
    uid = pods.service_account("app")
    await service_accounts.get(pods.namespace, "app")
    faulty.outage()
    clock.advance(TTL_S * 10)
    assert (await service_accounts.get(pods.namespace, "app")).uid == uid
    calls = faulty.calls["get"]
    assert (await service_accounts.get(pods.namespace, "app")).uid == uid
    assert faulty.calls["get"] == calls  # backing off: no call per request
    clock.advance(RETRY_S)
    await service_accounts.get(pods.namespace, "app")
    assert faulty.calls["get"] == calls + 1


async def test_an_unknown_service_account_fails_during_an_outage(
        pods: Pods, faulty: FaultyKube, service_accounts: ServiceAccountCache) -> None:
    pods.service_account("app")
    faulty.outage()
    with pytest.raises(UpstreamError) as caught:
        await service_accounts.get(pods.namespace, "app")
    assert caught.value.status == 0


async def test_a_deleted_service_account_is_forgotten(
        pods: Pods, service_accounts: ServiceAccountCache, clock: FakeClock) -> None:
    pods.service_account("app")
    await service_accounts.get(pods.namespace, "app")
    pods.delete_service_account("app")
    clock.advance(TTL_S)
    with pytest.raises(UpstreamError) as caught:
        await service_accounts.get(pods.namespace, "app")
    assert caught.value.status == 404
    assert len(service_accounts) == 0


async def test_concurrent_reads_of_one_service_account_make_one_call(
        pods: Pods, faulty: FaultyKube, service_accounts: ServiceAccountCache) -> None:
    pods.service_account("app")
    gate = faulty.stall("get")
    reads = [asyncio.create_task(service_accounts.get(pods.namespace, "app")) for _ in range(50)]
    await eventually(lambda: faulty.calls["get"] == 1)
    await settle()
    gate.set()
    assert len({r.uid for r in await asyncio.gather(*reads)}) == 1
    assert faulty.calls["get"] == 1


async def test_sec39_service_account_cache_is_lru_bounded(pods: Pods, kube: KubeClient, clock: FakeClock) -> None:
    cache = ServiceAccountCache(kube=kube, clock=clock, max_entries=10)
    for n in range(25):
        pods.service_account(f"sa-{n}")
        await cache.get(pods.namespace, f"sa-{n}")
    assert len(cache) == 10
    assert MAX_ENTRIES >= 1000
    await cache.aclose()
