"""The startup taint (SEC-02): removed from this node only once the interception rules are in place
and the pod watch has synced, with one JSON patch that never overwrites a concurrent change, and
retried with backoff when the API server refuses. The node, its taints, the patch's ``test``
operation, RBAC and the node-taint admission policy are the real API server's; agent-side time is
one FakeClock, and ``FaultyKube`` holds or records the calls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from metaemu.errors import UpstreamError
from metaemu.metrics import Metrics
from metaemu.pods.kube_client import KubeClient, KubeConnection
from metaemu.pods.pod_metrics import PodMetrics
from metaemu.pods.startup_taint import (
    CONFLICT_ATTEMPTS,
    READY_POLL_S,
    RETRY_INITIAL_S,
    StartupTaintMetrics,
    clear_startup_taint,
    create_startup_taint_metrics,
    startup_taint_clearer,
)
from metaemu.pods.watch import PodIndex, PodWatcher
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.kube_faults import FaultyKube
from tests.helpers import sample
from tests.kube.agent import unique
from tests.pods.support import HOST_IP, Pods, advance, eventually

#: The key the shipped config names and the node-taint admission policy lets the agent remove.
TAINT = "metaemu.dev/agent-not-ready"
STARTUP = {"key": TAINT, "value": "true", "effect": "NoSchedule"}
OTHER = {"key": "example.com/maintenance", "effect": "NoSchedule"}
#: ``node.kubernetes.io/not-ready``, which the API server's TaintNodesByCondition admission adds to
#: every new Node (no node controller runs here to take it away); tests compare ``taints(...)``.
CONTROLLER_KEYS = frozenset({"node.kubernetes.io/not-ready"})


def taints(pods: Pods) -> list[dict[str, Any]]:
    """The node's taints as the API server has them, less those the server adds by itself."""
    node = pods.cluster.ok("GET", f"/api/v1/nodes/{pods.node}")
    return [t for t in node["spec"].get("taints", []) if t["key"] not in CONTROLLER_KEYS]


def set_taints(pods: Pods, wanted: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Set the node's taints as an admin (merge patch: the whole list); returns the full new list."""
    node = pods.cluster.ok("GET", f"/api/v1/nodes/{pods.node}")
    keep = [t for t in node["spec"].get("taints", []) if t["key"] in CONTROLLER_KEYS]
    done = pods.cluster.ok("PATCH", f"/api/v1/nodes/{pods.node}", {"spec": {"taints": [*keep, *wanted]}},
                           content_type="application/merge-patch+json")
    return list(done["spec"]["taints"])


def patches(faulty: FaultyKube) -> list[int]:
    """The statuses the node patches got."""
    return [a.status for a in faulty.answers if a.call.endpoint == "node_patch"]


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


async def ready(state: Agent, clock: FakeClock, faulty: FaultyKube) -> None:
    """Wait for the watch to sync, then let the clearer's readiness poll come round."""
    await eventually(lambda: state.index.synced)
    await clock.wait_for_sleepers(1)
    await advance(clock, faulty, READY_POLL_S)


@pytest.fixture
async def agent(pods: Pods, clock: FakeClock, metrics: Metrics,
                pod_metrics: PodMetrics) -> AsyncIterator[Callable[[KubeClient], Agent]]:
    """Starts (on call, with a KubeClient) the pod watcher and the clearer; stops both at the end."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def start(kube: KubeClient) -> Agent:
        index = PodIndex(node_name=pods.node, host_addresses=[HOST_IP])
        state = Agent(index=index, watcher=PodWatcher(kube=kube, index=index, clock=clock, metrics=pod_metrics),
                      taint_metrics=create_startup_taint_metrics(metrics.registry))

        async def record_sync() -> None:
            await index.wait_synced()
            state.events["informer_synced"] = clock.time()

        tasks.extend([asyncio.create_task(state.watcher.pod_watcher()), asyncio.create_task(record_sync()),
                      asyncio.create_task(startup_taint_clearer(
                          kube, node=pods.node, key=TAINT, ready=state.ready, clock=clock,
                          metrics=state.taint_metrics, stop_event=stop))])
        return state

    yield start
    stop.set()
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_sec02_the_taint_goes_only_after_the_rules_and_the_synced_watch(
        pods: Pods, faulty: FaultyKube, kube: KubeClient, clock: FakeClock, metrics: Metrics,
        agent: Callable[[KubeClient], Agent]) -> None:
    before = set_taints(pods, [OTHER, STARTUP])
    faulty.stall("list")  # the pod list is slow to come (within its 10 s timeout)
    state = agent(kube)
    await clock.wait_for_sleepers(2)  # the clearer polls readiness; the list waits on its deadline
    for _ in range(4):
        clock.advance(READY_POLL_S)
        await settle()
    assert patches(faulty) == [] and faulty.calls["node_get"] == 0  # nothing is even read before ready

    clock.advance(0.5)
    state.rules_installed = True  # node-setup's rules verified (the sidecar's startup probe)
    state.events["rule_installed"] = clock.time()
    clock.advance(READY_POLL_S)
    await settle()
    assert patches(faulty) == []  # rules alone are not enough: the watch has not synced

    clock.advance(0.5)
    faulty.unstall("list")
    await eventually(lambda: state.index.synced)
    assert patches(faulty) == []  # the clearer is asleep until its next poll
    await advance(clock, faulty, READY_POLL_S)
    await eventually(lambda: bool(patches(faulty)))

    [answer] = [a for a in faulty.answers if a.call.endpoint == "node_patch"]
    assert answer.status == 200
    state.events["taint_removed"] = answer.at
    assert state.events["rule_installed"] < state.events["informer_synced"] < state.events["taint_removed"]
    assert taints(pods) == [OTHER]  # only ours is gone
    assert sample(metrics, "metaemu_startup_taint_cleared") == 1
    assert answer.call.body == [{"op": "test", "path": "/spec/taints", "value": before},
                                {"op": "replace", "path": "/spec/taints", "value": before[:-1]}]


async def test_sec02_rules_missing_after_sync_keep_the_taint(
        pods: Pods, faulty: FaultyKube, kube: KubeClient, clock: FakeClock, metrics: Metrics,
        agent: Callable[[KubeClient], Agent]) -> None:
    set_taints(pods, [STARTUP])
    state = agent(kube)
    await eventually(lambda: state.index.synced)
    for _ in range(5):
        await advance(clock, faulty, READY_POLL_S)
    assert taints(pods) == [STARTUP] and faulty.calls["node_get"] == 0
    assert sample(metrics, "metaemu_startup_taint_cleared") == 0
    state.rules_installed = True
    await advance(clock, faulty, READY_POLL_S)
    await eventually(lambda: sample(metrics, "metaemu_startup_taint_cleared") == 1)
    assert taints(pods) == []


async def test_a_node_without_the_taint_is_left_alone(
        pods: Pods, faulty: FaultyKube, kube: KubeClient, clock: FakeClock, metrics: Metrics,
        agent: Callable[[KubeClient], Agent]) -> None:
    set_taints(pods, [OTHER])
    state = agent(kube)
    state.rules_installed = True
    await ready(state, clock, faulty)
    await eventually(lambda: sample(metrics, "metaemu_startup_taint_cleared") == 1)
    assert patches(faulty) == [] and faulty.calls["node_get"] == 1
    assert taints(pods) == [OTHER]


async def test_a_concurrent_change_to_the_taints_is_kept_not_overwritten(
        pods: Pods, faulty: FaultyKube, kube: KubeClient) -> None:
    """Another writer changes the taints between our read and our patch: the real server fails the
    ``test`` operation (422), applies nothing, and the patch is recomputed from a fresh read."""
    set_taints(pods, [STARTUP])
    faulty.stall("node_patch")
    clearing = asyncio.create_task(clear_startup_taint(kube, node=pods.node, key=TAINT))
    await eventually(lambda: faulty.calls["node_patch"] == 1)
    set_taints(pods, [STARTUP, OTHER])  # e.g. an operator cordoning the node for maintenance
    faulty.unstall("node_patch")
    assert await clearing is True
    assert patches(faulty) == [422, 200]
    assert taints(pods) == [OTHER]


async def test_endless_conflicts_give_up_after_the_bounded_attempts(
        pods: Pods, faulty: FaultyKube, kube: KubeClient) -> None:
    """Every patch races a writer that changes the taints after our read: the real server refuses
    each one, and the agent stops after ``CONFLICT_ATTEMPTS`` instead of fighting forever."""
    set_taints(pods, [STARTUP])
    flips = iter(range(CONFLICT_ATTEMPTS))

    async def writer() -> None:  # runs after our read, before our patch reaches the server
        await asyncio.to_thread(set_taints, pods, [STARTUP, {"key": f"example.com/flip-{next(flips)}",
                                                             "effect": "NoSchedule"}])

    faulty.before("node_patch", writer)
    with pytest.raises(UpstreamError) as conflict:
        await clear_startup_taint(kube, node=pods.node, key=TAINT)
    assert conflict.value.status == 422
    assert (faulty.calls["node_get"], faulty.calls["node_patch"]) == (CONFLICT_ATTEMPTS, CONFLICT_ATTEMPTS)
    assert patches(faulty) == [422] * CONFLICT_ATTEMPTS
    assert [t["key"] for t in taints(pods)] == [TAINT, f"example.com/flip-{CONFLICT_ATTEMPTS - 1}"]


async def test_a_bad_patch_is_refused_by_the_api_server(pods: Pods, kube: KubeClient) -> None:
    """The agent's own patches are the only kind the policy lets through: a taint without an effect
    is invalid (422, validation runs before the policy), another node is not its own (the node-taint
    policy: 403), and a missing node is 404 — and the node is unchanged."""
    set_taints(pods, [STARTUP])
    with pytest.raises(UpstreamError) as invalid:
        await kube.patch_node(pods.node, [{"op": "add", "path": "/spec/taints/-", "value": {"key": TAINT}}])
    assert invalid.value.status == 422 and "effect: Required value" in str(invalid.value)
    other = unique("node")
    pods.cluster.node(other, taints=[STARTUP])
    with pytest.raises(UpstreamError) as foreign:
        await kube.patch_node(other, [{"op": "replace", "path": "/spec/taints", "value": []}])
    assert foreign.value.status == 403
    with pytest.raises(UpstreamError) as missing:
        await kube.patch_node(unique("no-such-node"), [])
    assert missing.value.status == 404
    assert taints(pods) == [STARTUP]


async def test_sec29_a_refusal_is_retried_with_backoff_until_it_is_granted(
        pods: Pods, faulty: FaultyKube, clock: FakeClock, metrics: Metrics,
        agent: Callable[[KubeClient], Agent]) -> None:
    """An agent whose RBAC lacks ``patch nodes`` (SEC-29: a misconfigured install) keeps the taint,
    retries at 1, 2, 4, 8 s, and clears it on the first try after the rule is granted."""
    cluster = pods.cluster
    sa = unique("restricted-agent")
    cluster.service_account(pods.namespace, sa)
    user = f"system:serviceaccount:{pods.namespace}:{sa}"
    rules: list[dict[str, Any]] = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
                                   {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": sa},
                   "rules": rules})
    cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": sa}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                         "kind": "ClusterRole", "name": sa},
                   "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": pods.namespace}]})
    token = cluster.token_request(pods.namespace, sa, {"expirationSeconds": 3600}).body["status"]["token"]
    kube = KubeClient(connection=KubeConnection(server=cluster.server, token=token, ca_file=cluster.ca_file),
                      http=faulty, stream=faulty, clock=clock, metrics=metrics)
    set_taints(pods, [STARTUP])
    cluster.wait_until("the restricted role in force", lambda: can(cluster, user, "get") and not can(
        cluster, user, "patch"))

    state = agent(kube)
    state.rules_installed = True
    await ready(state, clock, faulty)
    await eventually(lambda: sample(metrics, "metaemu_upstream_errors_total", backend="k8s", status="403") == 1)
    waits: list[float] = []
    for _ in range(4):
        await clock.wait_for_sleepers(1)
        calls = faulty.calls["node_patch"]
        delay = RETRY_INITIAL_S * 2 ** len(waits)
        await advance(clock, faulty, delay - 0.001)
        assert faulty.calls["node_patch"] == calls  # not a moment early
        await advance(clock, faulty, 0.001)
        await eventually(lambda c=calls: faulty.calls["node_patch"] == c + 1)  # type: ignore[misc]
        waits.append(delay)
    assert waits == [1, 2, 4, 8]
    assert patches(faulty)[-1] == 403 and taints(pods) == [STARTUP]
    assert sample(metrics, "metaemu_startup_taint_cleared") == 0

    await eventually(lambda: faulty.in_flight == 0)
    cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": sa},
                   "rules": [*rules, {"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}]})
    cluster.wait_until("patch nodes granted", lambda: can(cluster, user, "patch"))
    await clock.wait_for_sleepers(1)
    await advance(clock, faulty, 16)
    await eventually(lambda: sample(metrics, "metaemu_startup_taint_cleared") == 1)
    assert taints(pods) == [] and patches(faulty)[-1] == 200


def can(cluster: Any, user: str, verb: str) -> bool:
    """The authorizer's answer for ``user`` on nodes (a SubjectAccessReview, as ``kubectl auth can-i``)."""
    review = cluster.ok("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                 "resourceAttributes": {"verb": verb, "resource": "nodes", "name": "any"}}})
    return bool(review["status"].get("allowed"))
