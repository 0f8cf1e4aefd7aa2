"""Fixtures for node-mode tests: a Kubernetes stand-in, a KubeClient talking to it in process, a pod
index for node ``node-a`` and (on request) a running ``PodWatcher``. Everything runs on one
``FakeClock``; nothing sleeps on real time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metaemu.metrics import Metrics, create_metrics
from metaemu.pods.kube_client import KubeClient, KubeConnection
from metaemu.pods.pod_metrics import PodMetrics, create_pod_metrics
from metaemu.pods.service_accounts import ServiceAccountCache
from metaemu.pods.watch import PodIndex, PodWatcher
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.fake_google_tokens import new_rsa_key
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.testing.fake_kubernetes import AGENT_TOKEN, FakeKubernetes
from tests.pods.support import API_SERVER, CLUSTER_ISSUER, NODE, NODE_IP


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def cluster_key() -> rsa.RSAPrivateKey:
    return new_rsa_key()  # RSA generation is slow; one key serves every test


@pytest.fixture
def fake(clock: FakeClock, cluster_key: rsa.RSAPrivateKey) -> FakeKubernetes:
    issuer = FakeIssuer(issuer=CLUSTER_ISSUER, kid="cluster-key", clock=clock, private_key=cluster_key)
    return FakeKubernetes(clock=clock, issuer=issuer)


@pytest.fixture
def metrics() -> Metrics:
    return create_metrics()


@pytest.fixture
def pod_metrics(metrics: Metrics) -> PodMetrics:
    return create_pod_metrics(metrics.registry)


@pytest.fixture
def kube(fake: FakeKubernetes, clock: FakeClock, metrics: Metrics) -> KubeClient:
    transport = fake.client(clock=clock)
    return KubeClient(connection=KubeConnection(server=API_SERVER, token=AGENT_TOKEN), http=transport,
                      stream=transport, clock=clock, metrics=metrics)


@pytest.fixture
def index() -> PodIndex:
    return PodIndex(node_name=NODE, host_addresses=[NODE_IP])


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
