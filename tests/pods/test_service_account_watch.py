"""ServiceAccountCache kept current by ServiceAccountWatcher (issue #11): annotation changes arrive as
events from the real API server's watch, no record is re-read while the watch is live, records age
by the TTL only once it is down, a read racing an event keeps the event, and a gap in the watch
(410 Gone) reads every record held again. Agent time is a FakeClock; nothing sleeps on it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from metaemu.errors import UpstreamError
from metaemu.metrics import Metrics
from metaemu.pods.kube_client import KubeClient
from metaemu.pods.pod_metrics import PodMetrics
from metaemu.pods.service_accounts import TTL_S, ServiceAccountCache, ServiceAccountWatcher
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.kube_faults import FaultyKube
from tests.helpers import sample
from tests.pods.support import GSA_ANNOTATION, Pods, advance, eventually

pytestmark = pytest.mark.kube

ONE = "one@demo-project.iam.gserviceaccount.com"
TWO = "two@demo-project.iam.gserviceaccount.com"


@pytest.fixture
async def watched(kube: KubeClient, faulty: FaultyKube, service_accounts: ServiceAccountCache, clock: FakeClock,
                  pod_metrics: PodMetrics, metrics: Metrics) -> AsyncIterator[ServiceAccountWatcher]:
    """A running service-account watch over ``service_accounts``, open before the test starts."""
    watcher = ServiceAccountWatcher(kube=kube, cache=service_accounts, clock=clock,
                                    synced=pod_metrics.account_watch_synced,
                                    restarts=pod_metrics.account_watch_restarts)
    task = asyncio.create_task(watcher.run(), name="service_account_watcher")
    await eventually(lambda: faulty.watches("sa_watch") == 1)
    assert sample(metrics, "metaemu_service_account_watch_synced") == 1
    yield watcher
    watcher.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def gsa_of(cache: ServiceAccountCache, namespace: str, name: str) -> str | None:
    found = cache.peek(namespace, name)
    return found[0].gsa_email if found else "(not held)"


async def test_an_annotation_change_applies_as_an_event_without_another_read(
        pods: Pods, faulty: FaultyKube, service_accounts: ServiceAccountCache,
        watched: ServiceAccountWatcher) -> None:
    pods.service_account("app", annotations={GSA_ANNOTATION: ONE})
    changed: list[tuple[str, str]] = []
    service_accounts.on_change = changed.append
    assert (await service_accounts.get(pods.namespace, "app")).gsa_email == ONE
    reads = faulty.calls["get"]
    pods.annotate_sa("app", GSA_ANNOTATION, TWO)
    await eventually(lambda: gsa_of(service_accounts, pods.namespace, "app") == TWO)
    assert (await service_accounts.get(pods.namespace, "app")).gsa_email == TWO
    assert faulty.calls["get"] == reads  # the event carried it: no read, no virtual time passed
    assert changed == [(pods.namespace, "app"), (pods.namespace, "app")]  # first read, then the change


async def test_service_accounts_not_held_are_ignored(pods: Pods, service_accounts: ServiceAccountCache,
                                                     watched: ServiceAccountWatcher) -> None:
    """SEC-39: every service account of the cluster streams past; only those held are kept."""
    pods.service_account("held")
    await service_accounts.get(pods.namespace, "held")
    for n in range(5):
        pods.service_account(f"other-{n}", annotations={GSA_ANNOTATION: ONE})
    pods.annotate_sa("held", GSA_ANNOTATION, TWO)
    await eventually(lambda: gsa_of(service_accounts, pods.namespace, "held") == TWO)
    assert service_accounts.keys() == [(pods.namespace, "held")]


async def test_while_the_watch_is_live_a_record_never_expires(
        pods: Pods, faulty: FaultyKube, clock: FakeClock, service_accounts: ServiceAccountCache,
        watched: ServiceAccountWatcher) -> None:
    pods.service_account("app")
    await service_accounts.get(pods.namespace, "app")
    reads = faulty.calls["get"]
    for _ in range(5):
        await advance(clock, faulty, TTL_S * 2)
        faulty.end_watches("sa_watch")  # the server's timeoutSeconds: it reconnects from where it was
        await eventually(lambda: faulty.watches("sa_watch") == 1)
        await service_accounts.get(pods.namespace, "app")
    assert faulty.calls["get"] == reads
    found = service_accounts.peek(pods.namespace, "app")
    assert found is not None and found[1] == clock.monotonic() + TTL_S  # the fast path looks again within a TTL


async def test_once_the_watch_is_down_records_age_by_the_ttl_from_then(
        pods: Pods, faulty: FaultyKube, clock: FakeClock, service_accounts: ServiceAccountCache,
        watched: ServiceAccountWatcher) -> None:
    pods.service_account("app")
    await advance(clock, faulty, 1.0)
    await service_accounts.get(pods.namespace, "app")
    await advance(clock, faulty, TTL_S * 3)  # long after the read: the watch kept it current
    faulty.fail("sa_watch", status_code=500, times=1000)
    faulty.break_watches("sa_watch")
    await eventually(lambda: faulty.watches("sa_watch") == 0 and faulty.calls["sa_watch"] >= 2)
    reads = faulty.calls["get"]
    await advance(clock, faulty, TTL_S - 1)
    await service_accounts.get(pods.namespace, "app")
    assert faulty.calls["get"] == reads  # still current: it was confirmed when the watch went down
    await advance(clock, faulty, 2)
    await service_accounts.get(pods.namespace, "app")
    assert faulty.calls["get"] == reads + 1


async def test_a_read_racing_an_event_keeps_the_event(
        pods: Pods, faulty: FaultyKube, service_accounts: ServiceAccountCache,
        watched: ServiceAccountWatcher) -> None:
    """The GET answers with the record as it was before a change whose event arrived meanwhile:
    the event wins (the watch is ordered; the GET's answer may be older)."""
    pods.service_account("app", annotations={GSA_ANNOTATION: ONE})
    before = pods.cluster.ok("GET", f"/api/v1/namespaces/{pods.namespace}/serviceaccounts/app")
    faulty.answer("get", status_code=200, body=json.dumps(before).encode())
    gate = faulty.stall("get")
    reading = asyncio.ensure_future(service_accounts.get(pods.namespace, "app"))
    await eventually(lambda: faulty.calls["get"] == 1)
    pods.annotate_sa("app", GSA_ANNOTATION, TWO)
    await event_delivered(faulty, service_accounts, pods.namespace, "app")
    gate.set()
    assert (await reading).gsa_email == TWO
    assert gsa_of(service_accounts, pods.namespace, "app") == TWO


async def test_a_deletion_racing_a_read_is_a_404(
        pods: Pods, faulty: FaultyKube, service_accounts: ServiceAccountCache,
        watched: ServiceAccountWatcher) -> None:
    pods.service_account("app")
    before = pods.cluster.ok("GET", f"/api/v1/namespaces/{pods.namespace}/serviceaccounts/app")
    faulty.answer("get", status_code=200, body=json.dumps(before).encode())
    gate = faulty.stall("get")
    reading = asyncio.ensure_future(service_accounts.get(pods.namespace, "app"))
    await eventually(lambda: faulty.calls["get"] == 1)
    pods.delete_service_account("app")
    await event_delivered(faulty, service_accounts, pods.namespace, "app")
    gate.set()
    with pytest.raises(UpstreamError) as caught:
        await reading
    assert caught.value.status == 404
    assert len(service_accounts) == 0


async def event_delivered(faulty: FaultyKube, cache: ServiceAccountCache, namespace: str, name: str) -> None:
    """Until the watch has applied an event for a read in flight (its race slot records it)."""
    await eventually(lambda: cache.raced(namespace, name))


async def test_a_deleted_service_account_is_dropped_on_its_event(
        pods: Pods, service_accounts: ServiceAccountCache, watched: ServiceAccountWatcher) -> None:
    pods.service_account("app")
    await service_accounts.get(pods.namespace, "app")
    dropped: list[tuple[str, str]] = []
    service_accounts.on_change = dropped.append
    pods.delete_service_account("app")
    await eventually(lambda: len(service_accounts) == 0)
    assert dropped == [(pods.namespace, "app")]


async def test_a_gap_in_the_watch_reads_every_record_held_again(
        pods: Pods, faulty: FaultyKube, metrics: Metrics, service_accounts: ServiceAccountCache,
        watched: ServiceAccountWatcher) -> None:
    """410 Gone: events may have been missed, so each record held is read again before the watch
    resumes from a new resourceVersion."""
    for name in ("a", "b"):
        pods.service_account(name)
        await service_accounts.get(pods.namespace, name)
    reads, lists = faulty.calls["get"], faulty.calls["sa_list"]
    faulty.inject(json.dumps({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                          "message": "too old resource version"}}).encode(),
                  "sa_watch")
    await eventually(lambda: faulty.calls["sa_list"] == lists + 1 and faulty.watches("sa_watch") == 1)
    assert faulty.calls["get"] == reads + 2
    assert sample(metrics, "metaemu_service_account_watch_restarts_total", reason="expired") == 1
    pods.annotate_sa("a", GSA_ANNOTATION, ONE)  # and it is live again
    await eventually(lambda: gsa_of(service_accounts, pods.namespace, "a") == ONE)


async def test_a_read_begun_before_a_gap_in_the_watch_is_not_taken_as_current(
        pods: Pods, faulty: FaultyKube, clock: FakeClock, service_accounts: ServiceAccountCache,
        watched: ServiceAccountWatcher) -> None:
    """The read's answer may predate the new watch's starting point (events in between are never
    replayed), so it ages by the TTL instead of being kept current by the watch."""
    pods.service_account("app")
    gate = faulty.stall("get")
    reading = asyncio.ensure_future(service_accounts.get(pods.namespace, "app"))
    await eventually(lambda: faulty.calls["get"] == 1)
    lists = faulty.calls["sa_list"]
    faulty.inject(json.dumps({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                          "message": "too old resource version"}}).encode(),
                  "sa_watch")
    await eventually(lambda: faulty.calls["sa_list"] == lists + 1 and faulty.watches("sa_watch") == 1)
    faulty.unstall("get")
    gate.set()
    await reading
    await advance(clock, faulty, TTL_S + 1)
    await service_accounts.get(pods.namespace, "app")
    assert faulty.calls["get"] == 2  # read again: the watch did not vouch for it
