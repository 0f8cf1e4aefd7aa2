"""PodIndex and PodWatcher: the candidate rule (SEC-12..SEC-14), node scoping and bounded memory
(SEC-13, SEC-39), list + watch with bookmarks, relist on 410 Gone, outages (SEC-36); and the
service-account cache (annotation changes within the TTL, SEC-26; stale records during outages)."""

from __future__ import annotations

import asyncio

import pytest

from metaemu.errors import UpstreamError
from metaemu.metrics import Metrics
from metaemu.pods.kube_client import KubeClient
from metaemu.pods.objects import PodRecord
from metaemu.pods.pod_metrics import PodMetrics
from metaemu.pods.service_accounts import MAX_ENTRIES, RETRY_S, TTL_S, ServiceAccountCache
from metaemu.pods.watch import WATCH_GRACE_S, WATCH_TIMEOUT_S, PodIndex, PodWatcher
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.fake_kubernetes import FakeKubernetes
from tests.helpers import sample
from tests.pods.support import GSA_ANNOTATION, NODE, NODE_IP, OTHER_NODE, eventually


def record(name: str, ip: str, *, node: str = NODE, phase: str = "Running", deleting: bool = False,
           host_network: bool = False, sa: str = "app", uid: str | None = None, ips: tuple[str, ...] = ()) -> PodRecord:
    return PodRecord(namespace="apps", name=name, uid=uid or f"uid-{name}", node_name=node, service_account=sa,
                     host_network=host_network, phase=phase, deleting=deleting, pod_ips=ips or (ip,))


def names(pods: tuple[PodRecord, ...]) -> list[str]:
    return sorted(p.name for p in pods)


# -- PodIndex ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_sec12_terminal_pods_are_never_candidates(index: PodIndex, phase: str) -> None:
    index.upsert(record("done", "10.1.0.5", phase=phase))
    assert index.candidates("10.1.0.5") == ()


def test_sec12_a_pod_with_a_deletion_timestamp_is_never_a_candidate(index: PodIndex) -> None:
    index.upsert(record("web", "10.1.0.5"))
    index.upsert(record("web", "10.1.0.5", deleting=True))
    assert index.candidates("10.1.0.5") == ()
    assert index.pods_of_service_account("apps", "app") == ()


def test_pending_pod_with_an_address_is_a_candidate(index: PodIndex) -> None:
    index.upsert(record("starting", "10.1.0.5", phase="Pending"))
    assert names(index.candidates("10.1.0.5")) == ["starting"]


def test_sec13_sec39_pods_of_other_nodes_are_not_kept(index: PodIndex) -> None:
    index.upsert(record("elsewhere", "10.2.0.5", node=OTHER_NODE))
    index.replace([record("mine", "10.1.0.5"), record("theirs", "10.2.0.6", node=OTHER_NODE)])
    assert len(index) == 1
    assert index.candidates("10.2.0.5") == index.candidates("10.2.0.6") == ()


def test_sec13_a_pod_moving_to_another_node_record_is_dropped(index: PodIndex) -> None:
    index.upsert(record("web", "10.1.0.5"))
    index.upsert(record("web", "10.1.0.5", node=OTHER_NODE))
    assert len(index) == 0


def test_sec14_host_network_pods_make_their_addresses_host_addresses(index: PodIndex) -> None:
    index.upsert(record("agent", "10.0.0.11", host_network=True))
    assert index.candidates("10.0.0.11") == ()
    assert index.is_host_address("10.0.0.11")
    assert index.is_host_address(NODE_IP)
    assert index.is_host_address("127.0.0.1")
    assert index.is_host_address("::1")
    assert not index.is_host_address("10.1.0.5")


def test_every_dual_stack_address_is_indexed(index: PodIndex) -> None:
    index.upsert(record("web", "10.1.0.5", ips=("10.1.0.5", "fd00::5")))
    assert names(index.candidates("10.1.0.5")) == names(index.candidates("fd00::5")) == ["web"]


def test_replace_drops_pods_missing_from_the_list(index: PodIndex) -> None:
    index.upsert(record("old", "10.1.0.5"))
    index.replace([record("new", "10.1.0.6")])
    assert index.candidates("10.1.0.5") == ()
    assert names(index.candidates("10.1.0.6")) == ["new"]


def test_index_tracks_service_accounts_with_running_pods(index: PodIndex) -> None:
    index.upsert(record("a", "10.1.0.5", sa="one"))
    index.upsert(record("b", "10.1.0.6", sa="two", phase="Succeeded"))
    assert index.service_accounts() == {("apps", "one")}


async def test_wait_for_candidates_wakes_when_the_pod_is_indexed(index: PodIndex, clock: FakeClock) -> None:
    waiting = asyncio.create_task(index.wait_for_candidates("10.1.0.5", timeout_s=3, clock=clock))
    await settle()
    index.upsert(record("web", "10.1.0.5"))
    assert names(await waiting) == ["web"]


async def test_wait_for_candidates_gives_up_after_its_timeout(index: PodIndex, clock: FakeClock) -> None:
    waiting = asyncio.create_task(index.wait_for_candidates("10.1.0.5", timeout_s=3, clock=clock))
    await clock.wait_for_sleepers(1)
    index.upsert(record("other", "10.1.0.6"))  # another address: not a reason to return
    await settle()
    assert not waiting.done()
    clock.advance(3)
    assert await waiting == ()


# -- PodWatcher --------------------------------------------------------------------------------------


async def test_lists_this_nodes_pods_then_applies_watch_events(
        fake: FakeKubernetes, index: PodIndex, watcher: PodWatcher, metrics: Metrics) -> None:
    fake.add_pod("apps", "web", node=NODE, ips=["10.1.0.5"])
    fake.add_pod("apps", "far", node=OTHER_NODE, ips=["10.2.0.5"])
    await eventually(lambda: index.synced)
    assert sample(metrics, "metaemu_pod_watch_synced") == 1
    assert fake.requests[0].query["fieldSelector"] == f"spec.nodeName={NODE}"
    fake.add_pod("apps", "api", node=NODE, ips=["10.1.0.6"])
    await eventually(lambda: len(index.candidates("10.1.0.6")) == 1)
    fake.delete_pod("apps", "web", grace_period_s=30)
    await eventually(lambda: index.candidates("10.1.0.5") == ())
    fake.delete_pod("apps", "web")
    await eventually(lambda: len(index) == 1)
    assert fake.calls["list"] == 1


async def test_sec12_phase_changes_are_observed(fake: FakeKubernetes, index: PodIndex, watcher: PodWatcher) -> None:
    fake.add_pod("apps", "job", node=NODE, ips=["10.1.0.7"])
    await eventually(lambda: len(index.candidates("10.1.0.7")) == 1)
    fake.set_phase("apps", "job", "Succeeded")
    await eventually(lambda: index.candidates("10.1.0.7") == ())


async def test_bookmarks_advance_the_resource_version(fake: FakeKubernetes, index: PodIndex,
                                                      watcher: PodWatcher) -> None:
    await eventually(lambda: index.synced)
    await eventually(lambda: fake.store.watch_count == 1)
    fake.add_service_account("apps", "unrelated")  # moves the cluster resourceVersion, no pod event
    fake.bookmark()
    await eventually(lambda: watcher.resource_version == str(fake.store.resource_version))
    assert fake.requests[-1].query["allowWatchBookmarks"] == "true"


async def test_reconnects_from_its_resource_version_when_the_watch_times_out(
        fake: FakeKubernetes, index: PodIndex, watcher: PodWatcher, clock: FakeClock) -> None:
    await eventually(lambda: fake.store.watch_count == 1)
    clock.advance(WATCH_TIMEOUT_S)
    await eventually(lambda: fake.calls["watch"] == 2 and fake.store.watch_count == 1)
    assert fake.requests[-1].query["resourceVersion"] == watcher.resource_version
    assert fake.calls["list"] == 1


async def test_relists_on_410_gone_and_catches_up_with_missed_changes(
        fake: FakeKubernetes, index: PodIndex, watcher: PodWatcher, clock: FakeClock, metrics: Metrics) -> None:
    fake.add_pod("apps", "gone-while-away", node=NODE, ips=["10.1.0.5"])
    await eventually(lambda: len(index) == 1 and fake.store.watch_count == 1)
    fake.outage()  # the watcher loses the API ...
    await settle()
    fake.delete_pod("apps", "gone-while-away")  # ... changes happen and history is compacted ...
    fake.add_pod("apps", "new-while-away", node=NODE, ips=["10.1.0.6"])
    fake.compact()
    fake.restore()  # ... and the API comes back
    clock.advance(2)
    await eventually(lambda: fake.calls["list"] == 2 and len(index.candidates("10.1.0.6")) == 1)
    assert index.candidates("10.1.0.5") == ()
    assert sample(metrics, "metaemu_pod_watch_restarts_total", reason="expired") == 1
    assert index.synced


async def test_relists_when_the_watch_request_itself_answers_410(
        fake: FakeKubernetes, index: PodIndex, watcher: PodWatcher, clock: FakeClock) -> None:
    await eventually(lambda: fake.store.watch_count == 1)
    fake.fail("watch", status_code=410)
    fake.store.end_watches(broken=False)
    await settle()
    clock.advance(1)  # the empty, instant watch counted as no progress: one backoff step
    await eventually(lambda: fake.calls["watch"] == 3 and fake.calls["list"] == 2)  # 410, relist at once, watch


async def test_sec36_api_outage_keeps_the_last_known_pods(
        fake: FakeKubernetes, index: PodIndex, watcher: PodWatcher, clock: FakeClock, metrics: Metrics) -> None:
    fake.add_pod("apps", "web", node=NODE, ips=["10.1.0.5"])
    await eventually(lambda: len(index) == 1)
    fake.outage()
    for step in (1, 2, 4, 8, 16, 30, 30):  # the watcher backs off while the API is down
        await settle()
        clock.advance(step)
    assert names(index.candidates("10.1.0.5")) == ["web"]
    assert index.synced
    assert sample(metrics, "metaemu_pod_watch_restarts_total", reason="error") >= 5
    fake.add_pod("apps", "api", node=NODE, ips=["10.1.0.6"])  # written while the watcher cannot see it
    fake.restore()
    await settle()
    clock.advance(30)
    await eventually(lambda: len(index.candidates("10.1.0.6")) == 1)
    assert fake.calls["list"] == 1  # the watch resumed from its resourceVersion: no relist needed


async def test_a_stalled_watch_is_abandoned_after_its_timeout(
        fake: FakeKubernetes, index: PodIndex, watcher: PodWatcher, clock: FakeClock, metrics: Metrics) -> None:
    await eventually(lambda: fake.store.watch_count == 1)
    fake.stall("watch")
    fake.store.end_watches(broken=False)
    await settle()
    clock.advance(1)  # backoff after the instant, empty watch
    await eventually(lambda: fake.calls["watch"] == 2)
    clock.advance(WATCH_TIMEOUT_S + WATCH_GRACE_S)
    await eventually(lambda: sample(metrics, "metaemu_pod_watch_restarts_total", reason="error") == 1)
    fake.unstall("watch")


async def test_stop_ends_the_watcher(kube: KubeClient, index: PodIndex, clock: FakeClock,
                                     pod_metrics: PodMetrics, fake: FakeKubernetes) -> None:
    watcher = PodWatcher(kube=kube, index=index, clock=clock, metrics=pod_metrics)
    task = asyncio.create_task(watcher.pod_watcher())
    await eventually(lambda: fake.store.watch_count == 1)
    watcher.stop()
    await asyncio.wait_for(task, timeout=5)
    assert fake.store.watch_count == 0


async def test_sec39_index_holds_only_this_nodes_pods_in_a_large_cluster(
        fake: FakeKubernetes, index: PodIndex, watcher: PodWatcher) -> None:
    for n in range(5000):
        fake.add_service_account(f"ns-{n % 50}", f"ksa-{n}")
    for n in range(10_000):
        node = NODE if n % 100 == 0 else f"node-{n % 100}"
        fake.add_pod(f"ns-{n % 50}", f"pod-{n}", node=node, ips=[f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"],
                     service_account=f"ksa-{n % 5000}")
    await eventually(lambda: index.synced and len(index) == 100, rounds=200)
    assert len(index) == 100


# -- ServiceAccountCache -----------------------------------------------------------------------------


async def test_annotation_change_is_seen_within_the_ttl(
        fake: FakeKubernetes, service_accounts: ServiceAccountCache, clock: FakeClock) -> None:
    fake.add_service_account("apps", "app", annotations={GSA_ANNOTATION: "one@p.iam.gserviceaccount.com"})
    assert (await service_accounts.get("apps", "app")).gsa_email == "one@p.iam.gserviceaccount.com"
    fake.annotate_sa("apps", "app", GSA_ANNOTATION, "two@p.iam.gserviceaccount.com")
    assert (await service_accounts.get("apps", "app")).gsa_email == "one@p.iam.gserviceaccount.com"  # cached
    clock.advance(TTL_S)
    assert (await service_accounts.get("apps", "app")).gsa_email == "two@p.iam.gserviceaccount.com"
    assert TTL_S < 60  # issue #4: within a minute
    fake.annotate_sa("apps", "app", GSA_ANNOTATION, None)
    clock.advance(TTL_S)
    assert (await service_accounts.get("apps", "app")).gsa_email is None


async def test_sec36_a_known_service_account_is_served_stale_during_an_outage(
        fake: FakeKubernetes, service_accounts: ServiceAccountCache, clock: FakeClock) -> None:
    fake.add_service_account("apps", "app", uid="sa-uid")
    await service_accounts.get("apps", "app")
    fake.outage()
    clock.advance(TTL_S * 10)
    assert (await service_accounts.get("apps", "app")).uid == "sa-uid"
    calls = fake.calls["get"]
    assert (await service_accounts.get("apps", "app")).uid == "sa-uid"
    assert fake.calls["get"] == calls  # backing off: no call per request
    clock.advance(RETRY_S)
    await service_accounts.get("apps", "app")
    assert fake.calls["get"] == calls + 1


async def test_an_unknown_service_account_fails_during_an_outage(
        fake: FakeKubernetes, service_accounts: ServiceAccountCache) -> None:
    fake.add_service_account("apps", "app")
    fake.outage()
    with pytest.raises(UpstreamError) as caught:
        await service_accounts.get("apps", "app")
    assert caught.value.status == 0


async def test_a_deleted_service_account_is_forgotten(
        fake: FakeKubernetes, service_accounts: ServiceAccountCache, clock: FakeClock) -> None:
    fake.add_service_account("apps", "app")
    await service_accounts.get("apps", "app")
    fake.delete_service_account("apps", "app")
    clock.advance(TTL_S)
    with pytest.raises(UpstreamError) as caught:
        await service_accounts.get("apps", "app")
    assert caught.value.status == 404
    assert len(service_accounts) == 0


async def test_concurrent_reads_of_one_service_account_make_one_call(
        fake: FakeKubernetes, service_accounts: ServiceAccountCache) -> None:
    fake.add_service_account("apps", "app")
    gate = fake.stall("get")
    reads = [asyncio.create_task(service_accounts.get("apps", "app")) for _ in range(50)]
    await eventually(lambda: fake.calls["get"] == 1)
    gate.set()
    assert len({r.uid for r in await asyncio.gather(*reads)}) == 1
    assert fake.calls["get"] == 1


async def test_sec39_service_account_cache_is_lru_bounded(
        fake: FakeKubernetes, kube: KubeClient, clock: FakeClock) -> None:
    cache = ServiceAccountCache(kube=kube, clock=clock, max_entries=10)
    for n in range(25):
        fake.add_service_account("apps", f"sa-{n}")
        await cache.get("apps", f"sa-{n}")
    assert len(cache) == 10
    assert MAX_ENTRIES >= 1000
