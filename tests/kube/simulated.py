"""The simulated node (tests/node/netns.py) joined to the session's real control plane: what every
node-mode test and benchmark on it starts with."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tests.kube.cluster import KubeCluster, stop_process
from tests.node.netns import SimulatedNode


@contextlib.contextmanager
def rules_and_apiserver(cluster: KubeCluster, node: SimulatedNode, *, to: str) -> Iterator[str]:
    """On ``node``: a second kube-apiserver of ``cluster`` on the node namespace's own loopback
    (the node cannot reach the host's) and node-setup's real rules redirecting pods'
    169.254.169.254:80 to ``to``. Yields node-setup's log (JSON lines); raises RuntimeError if it
    failed. The API server is stopped on exit; the rules go with the namespace."""
    apiserver = cluster.apiserver_in(node.exec_prefix(node.node_ns), node.node_ns)
    try:
        setup = node.run_in(node.node_ns, sys.executable, "-m", "metaemu", "node-setup", "--to", to,
                            "--pod-interface", "vethpod+", check=False, timeout_s=60)
        if setup.returncode != 0:
            raise RuntimeError(f"node-setup failed: {setup.stderr}")
        yield setup.stderr
    finally:
        stop_process(apiserver)
