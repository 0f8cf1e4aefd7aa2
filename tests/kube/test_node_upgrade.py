"""Node-mode upgrades and restarts on the simulated node (issue #11): two real ``metaemu serve``
processes in the node's network namespace, sharing one Google stand-in (``node_world
--google-port``) and the test bed's real kube-apiserver, behind the real interception rules; pods'
client loops (tests/node/metadata_loop.py: keep-alive, no retries) run through the hand-over.

- Surge: the new agent finds the address answering, warms, then listens (SO_REUSEPORT, new
  connections steered to it); the old one drains on SIGTERM and exits. Not one request fails, and
  every token a pod got is its own service account's.
- Crash: SIGKILL, then a new agent; it is back with one exchange per service account, no burst.

Timing is measured by benchmarks/node_upgrade.py, never asserted here.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube.cluster import KubeCluster
from tests.kube.test_simulated_node import raw_get
from tests.kube.upgrade_world import START_S, TOKEN_PATH, Upgrade, finish, foreign_tokens, served, upgrade_world

pytestmark = [pytest.mark.kube, pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(c) for c in ("ip", "iptables", "conntrack")),
    reason="needs root, iproute2, iptables and conntrack to build a simulated node")]


@pytest.fixture
def upgrade(cluster: KubeCluster, tmp_path: Path) -> Iterator[Upgrade]:
    with upgrade_world(cluster, tmp_path) as world:
        yield world


def assert_own_tokens(world: Upgrade, results: dict[int, dict[str, Any]]) -> None:
    """Every token each pod got is its own Google account's (0 invalid or foreign tokens)."""
    assert all(result["tokens"] for result in results.values()), results
    assert foreign_tokens(world, results) == []


def test_a_surge_upgrade_hands_the_node_over_without_a_failed_request(upgrade: Upgrade) -> None:
    old = upgrade.start_agent(1)
    upgrade.wait_ready(1, old)
    for i in upgrade.node.pods:
        upgrade.pod(i)
    loops = upgrade.loops(rate_per_s=15, max_s=120)  # under the per-pod rate limit (20/s)
    new = upgrade.start_agent(2)
    upgrade.wait_ready(2, new)  # warmed, then listening; only then would Kubernetes stop the old pod
    assert "another agent serves the metadata address: warming before taking connections" in upgrade.log_messages(2)
    old.send_signal(signal.SIGTERM)
    assert old.wait(timeout=START_S) == 0
    assert "draining: handing connections over" in upgrade.log_messages(1)
    for i in upgrade.node.pods:  # the new agent alone serves every pod now
        status, _ = raw_get(upgrade.node, upgrade.node.pod_ns(i), TOKEN_PATH)
        assert status == 200
    results = finish(loops)
    for i, result in results.items():
        assert result["failure_count"] == 0, (i, result["failures"])
        assert result["statuses"] == {"200": result["requests"]}, (i, result["statuses"])
    assert_own_tokens(upgrade, results)


def test_the_successor_takes_every_new_connection_once_it_listens(upgrade: Upgrade) -> None:
    """SO_REUSEPORT with the steering program: while both listen, fresh connections reach the new
    agent only (the old one's request counter stands still), so none is queued on the old socket."""
    old = upgrade.start_agent(1)
    upgrade.wait_ready(1, old)
    upgrade.pod(1)
    assert raw_get(upgrade.node, upgrade.node.pod_ns(1), TOKEN_PATH)[0] == 200
    new = upgrade.start_agent(2)
    upgrade.wait_ready(2, new)
    before = served(upgrade, 1)
    for _ in range(10):  # each a fresh connection
        assert raw_get(upgrade.node, upgrade.node.pod_ns(1), TOKEN_PATH)[0] == 200
    assert served(upgrade, 1) == before
    assert served(upgrade, 2) >= 10


def test_a_crashed_agent_comes_back_with_one_exchange_per_service_account(upgrade: Upgrade) -> None:
    first = upgrade.start_agent(1)
    upgrade.wait_ready(1, first)
    for i in upgrade.node.pods:
        upgrade.pod(i)
    loops = upgrade.loops(rate_per_s=15, max_s=120)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=START_S)
    before = upgrade.calls()
    second = upgrade.start_agent(2)  # as kubelet restarts a crashed container: nothing answers meanwhile
    upgrade.wait_ready(2, second)
    for i in upgrade.node.pods:
        assert raw_get(upgrade.node, upgrade.node.pod_ns(i), TOKEN_PATH)[0] == 200
    results = finish(loops)
    after = upgrade.calls()
    pods = len(upgrade.node.pods)
    # One STS exchange and one impersonation per service account, whatever the loops asked meanwhile.
    assert after.get("sts", 0) - before.get("sts", 0) == pods
    assert after.get("generateAccessToken", 0) - before.get("generateAccessToken", 0) == pods
    assert "another agent serves the metadata address: warming before taking connections" not in \
        upgrade.log_messages(2)  # nothing answered: it listened at once
    for i, result in results.items():  # during the gap: refused or reset, never a wrong answer
        assert set(result["statuses"]) <= {"200", "error"}, (i, result["statuses"])
    assert_own_tokens(upgrade, results)
