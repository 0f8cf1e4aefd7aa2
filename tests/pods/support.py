"""The real API server as the node-mode unit tests use it: a fresh Node per test (the agent's own
hostNetwork pod on it, and its pod-bound token), a namespace of the test's own, objects made as a
kubelet and an admin would make them, and polling for what arrives over real sockets."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.kube_faults import FaultyKube
from tests.kube.agent import AGENT_NAMESPACE, GSA_ANNOTATION, shipped_config, unique
from tests.kube.cluster import KubeCluster

__all__ = ["AGENT_NAMESPACE", "GSA_ANNOTATION", "HOST_IP", "Pods", "eventually", "advance"]

#: The node's own address (the agent's hostNetwork pod has it too).
HOST_IP = "169.254.29.1"
#: Polls of ``eventually`` (10 ms apart) before it fails: a real round trip takes milliseconds.
POLL_ROUNDS = 1000


def audience() -> str:
    """The Workload Identity audience the shipped config (and the token admission policy) names."""
    return str(shipped_config()["node"]["audience"])


@dataclass
class Pods:
    """One test's node and namespace on the session's cluster."""

    cluster: KubeCluster
    node: str
    namespace: str = field(default_factory=lambda: unique("apps"))
    ips: Iterator[str] = field(default_factory=lambda: (f"169.254.40.{n}" for n in itertools.count(5)))

    def service_account(self, name: str = "app", *, annotations: dict[str, str] | None = None) -> str:
        """Create (or update) a service account; returns its UID."""
        return self.cluster.service_account(self.namespace, name, annotations=annotations)

    def pod(self, name: str, ip: str | None = None, *, sa: str = "app", node: str | None = None,
            phase: str = "Running", host_network: bool = False) -> dict[str, Any]:
        """A pod of ``sa`` (created when missing) on this node (or ``node``), with ``ip`` and
        ``phase`` reported as a kubelet reports them; returns the object as the API has it."""
        path = f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}"
        if self.cluster.request("GET", path).status == 404:
            self.service_account(sa)
        ip = ip or next(self.ips)
        self.cluster.pod(self.namespace, name, node=node or self.node, service_account=sa,
                         host_network=host_network)
        self.cluster.pod_status(self.namespace, name, ip=ip, host_ip=ip if host_network else HOST_IP, phase=phase)
        return self.get_pod(name)

    def get_pod(self, name: str) -> dict[str, Any]:
        return self.cluster.ok("GET", f"/api/v1/namespaces/{self.namespace}/pods/{name}")

    def delete_pod(self, name: str, *, grace_period_s: int = 0) -> None:
        """Delete a pod. With a grace period only ``deletionTimestamp`` is set (no kubelet finishes
        it: the pod is terminating, still listed); delete again without one to remove it."""
        self.cluster.ok("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{name}",
                        {"gracePeriodSeconds": grace_period_s})

    def set_phase(self, name: str, phase: str) -> None:
        ip = self.get_pod(name)["status"]["podIP"]
        self.cluster.pod_status(self.namespace, name, ip=ip, host_ip=HOST_IP, phase=phase)

    def annotate_sa(self, name: str, key: str, value: str | None) -> None:
        """Set (or with None remove) one annotation of a service account (a JSON merge patch)."""
        self.cluster.ok("PATCH", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{name}",
                        {"metadata": {"annotations": {key: value}}}, content_type="application/merge-patch+json")

    def delete_service_account(self, name: str) -> None:
        self.cluster.ok("DELETE", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{name}")


async def eventually(condition: Callable[[], bool], *, rounds: int = POLL_ROUNDS) -> None:
    """Poll ``condition`` (an index, a metric, a recorded call) every 10 ms: events arrive over real
    sockets from a real server. Fails after ``rounds`` polls; no virtual time passes."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def advance(clock: FakeClock, kube: FaultyKube, seconds: float) -> None:
    """Advance virtual time once nothing is on the wire (a real round trip takes no virtual time)."""
    while True:
        await kube.quiet()
        await settle()
        if kube.in_flight == 0:  # nothing set off by the answers that just arrived
            break
    clock.advance(seconds)
    await settle()
