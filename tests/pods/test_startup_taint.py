"""The startup taint (SEC-02): removed from this node only once the interception rules are in place
and the pod watch has synced, with one JSON patch that never overwrites a concurrent change, and
retried with backoff when the API server refuses. Everything runs on one FakeClock against the
Kubernetes stand-in, which applies RFC 6902 patches and validates taints as the API server does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from metaemu.metrics import Metrics
from metaemu.pods.kube_client import KubeClient
from metaemu.pods.pod_metrics import PodMetrics
from metaemu.pods.startup_taint import (
    READY_POLL_S,
    RETRY_INITIAL_S,
    StartupTaintMetrics,
    clear_startup_taint,
    create_startup_taint_metrics,
    startup_taint_clearer,
)
from metaemu.pods.watch import PodIndex, PodWatcher
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.fake_kubernetes import AGENT_TOKEN, FakeKubernetes
from tests.pods.support import NODE, eventually

TAINT = "metaemu.dev/agent-not-ready"
STARTUP = {"key": TAINT, "value": "true", "effect": "NoSchedule"}
OTHER = {"key": "node.kubernetes.io/network-unavailable", "effect": "NoSchedule"}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@dataclass
class Agent:
    """The parts of a node agent the clearer depends on: rules (a flag the test flips, as node-setup
    would), a pod watch, and the clearer task."""

    index: PodIndex
    watcher: PodWatcher
    taint_metrics: StartupTaintMetrics
    rules_installed: bool = False
    events: dict[str, float] = field(default_factory=dict)

    def ready(self) -> str | None:  # what NodeAgent.ready checks, in the same order
        if not self.index.synced:
            return "the pod watch has not synced yet"
        return None if self.rules_installed else "the interception rules are not in place"


async def ready(state: Agent, clock: FakeClock) -> None:
    """Wait for the watch to sync, then let the clearer's readiness poll come round."""
    await eventually(lambda: state.index.synced)
    await clock.wait_for_sleepers(1)
    clock.advance(READY_POLL_S)


@pytest.fixture
async def agent(kube: KubeClient, clock: FakeClock, metrics: Metrics,
                pod_metrics: PodMetrics) -> AsyncIterator[Callable[[], Agent]]:
    """Starts (on call) the pod watcher and the clearer; stops both at the end."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def start() -> Agent:
        index = PodIndex(node_name=NODE)
        state = Agent(index=index, watcher=PodWatcher(kube=kube, index=index, clock=clock, metrics=pod_metrics),
                      taint_metrics=create_startup_taint_metrics(metrics.registry))

        async def record_sync() -> None:
            await index.wait_synced()
            state.events["informer_synced"] = clock.time()

        tasks.extend([asyncio.create_task(state.watcher.pod_watcher()), asyncio.create_task(record_sync()),
                      asyncio.create_task(startup_taint_clearer(
                          kube, node=NODE, key=TAINT, ready=state.ready, clock=clock, metrics=state.taint_metrics,
                          stop_event=stop))])
        return state

    yield start
    stop.set()
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_sec02_the_taint_goes_only_after_the_rules_and_the_synced_watch(
        fake: FakeKubernetes, clock: FakeClock, metrics: Metrics, agent: Callable[[], Agent]) -> None:
    fake.add_node(NODE, taints=[OTHER, STARTUP])
    fake.stall("list")  # the pod list is slow to come
    state = agent()
    await clock.wait_for_sleepers(1)  # the clearer polls readiness
    for _ in range(5):
        clock.advance(10)
        await settle()
    assert fake.node_patches == [] and fake.calls["node_get"] == 0  # nothing is even read before ready

    clock.advance(1)
    state.rules_installed = True  # node-setup's rules verified (the sidecar's startup probe)
    state.events["rule_installed"] = clock.time()
    clock.advance(10)
    await settle()
    assert fake.node_patches == []  # rules alone are not enough: the watch has not synced

    clock.advance(1)
    fake.unstall("list")
    await eventually(lambda: state.index.synced)
    assert fake.node_patches == []  # the clearer is asleep until its next poll
    clock.advance(READY_POLL_S)
    await eventually(lambda: bool(fake.node_patches))

    [patch] = fake.node_patches
    assert patch.status == 200 and patch.applied_at is not None
    state.events["taint_removed"] = patch.applied_at
    assert state.events["rule_installed"] < state.events["informer_synced"] < state.events["taint_removed"]
    assert fake.node_taints(NODE) == [OTHER]  # only ours is gone
    assert sample(metrics, "metaemu_startup_taint_cleared") == 1
    assert patch.operations == [{"op": "test", "path": "/spec/taints", "value": [OTHER, STARTUP]},
                                {"op": "replace", "path": "/spec/taints", "value": [OTHER]}]


async def test_sec02_rules_missing_after_sync_keep_the_taint(
        fake: FakeKubernetes, clock: FakeClock, metrics: Metrics, agent: Callable[[], Agent]) -> None:
    fake.add_node(NODE, taints=[STARTUP])
    state = agent()
    await eventually(lambda: state.index.synced)
    for _ in range(5):
        clock.advance(READY_POLL_S)
        await settle()
    assert fake.node_taints(NODE) == [STARTUP]
    assert sample(metrics, "metaemu_startup_taint_cleared") == 0
    state.rules_installed = True
    clock.advance(READY_POLL_S)
    await eventually(lambda: fake.node_taints(NODE) == [])


async def test_a_node_without_the_taint_is_left_alone(
        fake: FakeKubernetes, clock: FakeClock, metrics: Metrics, agent: Callable[[], Agent]) -> None:
    fake.add_node(NODE, taints=[OTHER])
    state = agent()
    state.rules_installed = True
    await ready(state, clock)
    await eventually(lambda: sample(metrics, "metaemu_startup_taint_cleared") == 1)
    assert fake.node_patches == []
    assert fake.node_taints(NODE) == [OTHER]


async def test_a_concurrent_change_to_the_taints_is_kept_not_overwritten(
        fake: FakeKubernetes, kube: KubeClient) -> None:
    """Another writer changes the taints between our read and our patch: the ``test`` operation
    fails (422), nothing is applied, and the patch is recomputed from a fresh read."""
    fake.add_node(NODE, taints=[STARTUP])
    released = fake.stall("node_patch")
    clearing = asyncio.create_task(clear_startup_taint(kube, node=NODE, key=TAINT))
    await eventually(lambda: fake.calls["node_patch"] == 1)
    fake.nodes[NODE]["spec"]["taints"] = [STARTUP, OTHER]  # e.g. the node lifecycle controller
    fake.unstall("node_patch")
    assert released.is_set()
    assert await clearing is True
    assert [p.status for p in fake.node_patches] == [422, 200]
    assert fake.node_taints(NODE) == [OTHER]


async def test_sec29_a_refusal_is_retried_with_backoff_until_it_is_granted(
        fake: FakeKubernetes, clock: FakeClock, metrics: Metrics, agent: Callable[[], Agent]) -> None:
    fake.add_node(NODE, taints=[STARTUP])
    fake.revoke(AGENT_TOKEN, "patch nodes")  # RBAC without the nodes rule
    state = agent()
    state.rules_installed = True
    await ready(state, clock)
    await eventually(lambda: sample(metrics, "metaemu_upstream_errors_total", backend="k8s", status="403") == 1)
    waits: list[float] = []
    for _ in range(4):
        await clock.wait_for_sleepers(1)
        before = fake.calls["node_patch"]
        delay = RETRY_INITIAL_S * 2 ** len(waits)
        clock.advance(delay - 0.001)
        await settle()
        assert fake.calls["node_patch"] == before  # not a moment early
        clock.advance(0.001)
        await eventually(lambda b=before: fake.calls["node_patch"] == b + 1)  # type: ignore[misc]
        waits.append(delay)
    assert waits == [1, 2, 4, 8]
    assert fake.node_taints(NODE) == [STARTUP]
    assert sample(metrics, "metaemu_startup_taint_cleared") == 0
    fake.add_user(AGENT_TOKEN, "system:serviceaccount:kube-system:metaemu")  # the rule is added
    clock.advance(16)
    await eventually(lambda: fake.node_taints(NODE) == [])
    assert sample(metrics, "metaemu_startup_taint_cleared") == 1


async def test_a_bad_patch_is_refused_by_the_stand_in_as_the_api_server_would(
        fake: FakeKubernetes, kube: KubeClient) -> None:
    """The stand-in is strict: a taint without an effect, or the wrong patch type, is rejected."""
    from metaemu.errors import UpstreamError

    fake.add_node(NODE, taints=[STARTUP])
    with pytest.raises(UpstreamError) as invalid:
        await kube.patch_node(NODE, [{"op": "add", "path": "/spec/taints/-", "value": {"key": "x"}}])
    assert invalid.value.status == 422
    with pytest.raises(UpstreamError) as missing:
        await kube.patch_node("no-such-node", [])
    assert missing.value.status == 404
    assert fake.node_taints(NODE) == [STARTUP]


async def test_endless_conflicts_give_up_after_the_bounded_attempts(fake: FakeKubernetes, kube: KubeClient) -> None:
    from metaemu.errors import UpstreamError
    from metaemu.pods.startup_taint import CONFLICT_ATTEMPTS

    fake.add_node(NODE, taints=[STARTUP])
    fake.fail("node_patch", status_code=422, times=CONFLICT_ATTEMPTS)
    with pytest.raises(UpstreamError) as conflict:
        await clear_startup_taint(kube, node=NODE, key=TAINT)
    assert conflict.value.status == 422
    assert (fake.calls["node_get"], fake.calls["node_patch"]) == (CONFLICT_ATTEMPTS, CONFLICT_ATTEMPTS)
    assert fake.node_taints(NODE) == [STARTUP]
