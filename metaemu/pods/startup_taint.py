"""The node's startup taint, cleared only once the agent can serve pods (SEC-02, node mode).

A node registers with a taint such as ``metaemu.dev/agent-not-ready:NoSchedule`` (kubelet
``--register-with-taints``, or the node pool's taints), so no workload is scheduled onto it before
metaemu answers there: a pod started earlier would find nothing at 169.254.169.254, or on a cloud
VM the real metadata server (lesson 1, SEC-01). The agent removes the taint when ``ready`` says it
can serve: the interception rules verified (the node-setup sidecar's startup probe gates the agent's
start; with ``node.intercept_*`` the agent's own reconciler must have found them) and the pod watch
synced. The taint is never put back: an agent restart does not evict or block workloads, and
interception stays in place while it is down (SEC-05).

The same pattern as Cilium's ``node.cilium.io/agent-not-ready``. The removal is one RFC 6902 JSON
patch that ``test``s the taints it read, so a concurrent writer (kubelet, the node lifecycle
controller, an autoscaler) is never overwritten: the patch fails with 422 and is recomputed. The
admission policy in ``manifests/node`` lets the agent make exactly this change on its own node.

Not owned here: when the agent is ready (``NodeAgent.ready``), the API calls (``KubeClient``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge

from metaemu.clock import Clock
from metaemu.errors import UpstreamError
from metaemu.pods.kube_client import KubeClient

log = logging.getLogger(__name__)


#: How often readiness is re-checked before the taint may go (a pod watch syncs in well under a second).
READY_POLL_S = 1.0
#: Retries after a failed read or patch: from 1 s, doubling, up to 5 min (an RBAC or admission
#: mistake does not heal itself; the log says so every time).
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 300.0
#: Patches recomputed after another writer changed the taints between our read and our patch.
CONFLICT_ATTEMPTS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class StartupTaintMetrics:
    cleared: Gauge  # metaemu_startup_taint_cleared: 1 once the taint was removed or found absent


def create_startup_taint_metrics(registry: CollectorRegistry) -> StartupTaintMetrics:
    return StartupTaintMetrics(cleared=Gauge(
        "metaemu_startup_taint_cleared", "1 once this node's startup taint has been removed (or was absent) "
        "after the agent became ready; 0 before.", registry=registry))


async def clear_startup_taint(kube: KubeClient, *, node: str, key: str) -> bool:
    """Remove every taint of ``key`` from ``node``; returns whether one was there.

    Raises ``UpstreamError`` when the node cannot be read or patched (403: RBAC or the admission
    policy; 404: no such node), or after ``CONFLICT_ATTEMPTS`` conflicting concurrent changes.
    """
    attempt = 0
    while True:
        attempt += 1
        taints = await kube.get_node_taints(node)
        keep = [t for t in taints if t.get("key") != key]
        if len(keep) == len(taints):
            return False
        # ``test`` first: if anyone changed the taints since the read, nothing is applied (422).
        patch = [{"op": "test", "path": "/spec/taints", "value": taints},
                 {"op": "replace", "path": "/spec/taints", "value": keep}]
        try:
            await kube.patch_node(node, patch)
            return True
        except UpstreamError as exc:
            if exc.status not in (409, 422) or attempt == CONFLICT_ATTEMPTS:
                raise
            log.info("node taints changed concurrently; re-reading them", extra={"attempt": attempt})


async def startup_taint_clearer(kube: KubeClient, *, node: str, key: str, ready: Callable[[], str | None],
                                clock: Clock, metrics: StartupTaintMetrics, stop_event: asyncio.Event) -> None:
    """Wait until ``ready()`` returns None, then clear the taint, retrying with backoff until it is
    done or ``stop_event`` is set. Readiness is checked again before every attempt, so the taint never goes while
    the agent cannot serve (SEC-02)."""
    failures = 0
    while not stop_event.is_set():
        if (why := ready()) is not None:
            log.debug("keeping the startup taint", extra={"reason": why})
            await clock.sleep(READY_POLL_S, until=stop_event)
            continue
        try:
            removed = await clear_startup_taint(kube, node=node, key=key)
        except UpstreamError as exc:
            failures += 1
            delay = min(RETRY_MAX_S, RETRY_INITIAL_S * 2 ** (failures - 1))
            hint = {403: "grant get and patch on nodes and apply the metaemu-node-taint admission policy, or set "
                         "node.startup_taint to an empty string",
                    404: "node.name names no node"}.get(exc.status, "")
            log.warning("cannot clear the startup taint", extra={"status": exc.status, "hint": hint,
                                                                  "retry_in_s": delay, "taint": key})
            await clock.sleep(delay, until=stop_event)
            continue
        metrics.cleared.set(1)
        log.info("startup taint removed: workloads may be scheduled on this node" if removed
                 else "no startup taint on this node", extra={"taint": key, "node": node})
        return
