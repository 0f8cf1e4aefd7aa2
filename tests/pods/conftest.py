"""Fixtures for node-mode unit tests: the session's real API server (tests/conftest.py), a fresh
Node per test with the agent's pod-bound token for it, a KubeClient reaching the server through
``FaultyKube`` (the faults the real server cannot show on cue), a pod index for the node and (on
request) a running ``PodWatcher``. Agent-side time is one ``FakeClock``; nothing sleeps on it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from metaemu.metrics import Metrics, create_metrics
from metaemu.pods.kube_client import KubeClient, KubeConnection
from metaemu.pods.pod_metrics import PodMetrics, create_pod_metrics
from metaemu.pods.service_accounts import ServiceAccountCache
from metaemu.pods.stream import KubeHttp
from metaemu.pods.watch import PodIndex, PodWatcher
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.kube_faults import FaultyKube
from tests.kube.agent import agent_token, unique
from tests.kube.cluster import KubeCluster
from tests.pods.support import HOST_IP, Pods


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pods(cluster: KubeCluster) -> Pods:
    node = unique("node")
    cluster.node(node)
    return Pods(cluster, node)


@pytest.fixture
def metrics() -> Metrics:
    return create_metrics()


@pytest.fixture
def pod_metrics(metrics: Metrics) -> PodMetrics:
    return create_pod_metrics(metrics.registry)


@pytest.fixture
def connection(pods: Pods) -> KubeConnection:
    """The agent's connection with its token inline (bound to its hostNetwork pod on ``pods.node``):
    a token file would be read in a worker thread, real I/O that ``FaultyKube`` cannot see, so a
    test advancing the clock "when the agent is idle" could advance it mid-request."""
    return KubeConnection(server=pods.cluster.server, token=agent_token(pods.cluster, pods.node),
                          ca_file=pods.cluster.ca_file)


@pytest.fixture
async def faulty(connection: KubeConnection, clock: FakeClock) -> AsyncIterator[FaultyKube]:
    http = KubeHttp(ssl_context=connection.ssl_context())
    try:
        yield FaultyKube(http, clock=clock)
    finally:
        await http.close()


@pytest.fixture
def kube(faulty: FaultyKube, connection: KubeConnection, clock: FakeClock, metrics: Metrics) -> KubeClient:
    return KubeClient(connection=connection, http=faulty, stream=faulty, clock=clock, metrics=metrics)


@pytest.fixture
def index(pods: Pods) -> PodIndex:
    return PodIndex(node_name=pods.node, host_addresses=[HOST_IP])


@pytest.fixture
async def service_accounts(kube: KubeClient, clock: FakeClock) -> AsyncIterator[ServiceAccountCache]:
    cache = ServiceAccountCache(kube=kube, clock=clock)
    yield cache
    await cache.aclose()


@pytest.fixture
async def watcher(kube: KubeClient, index: PodIndex, clock: FakeClock,
                  pod_metrics: PodMetrics) -> AsyncIterator[PodWatcher]:
    """A running ``pod_watcher`` task, stopped and awaited at the end of the test."""
    pod_watcher = PodWatcher(kube=kube, index=index, clock=clock, metrics=pod_metrics)
    task = asyncio.create_task(pod_watcher.pod_watcher(), name="pod_watcher")
    yield pod_watcher
    pod_watcher.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
