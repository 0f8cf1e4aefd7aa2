"""Constants and helpers shared by the node-mode tests."""

from __future__ import annotations

from collections.abc import Callable

from metaemu.testing.fake_clock import settle

NODE = "node-a"
OTHER_NODE = "node-b"
NODE_IP = "10.0.0.10"
API_SERVER = "https://kubernetes.test:443"
CLUSTER_ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = ("//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
            "pool/providers/cluster")
GSA_ANNOTATION = "iam.gke.io/gcp-service-account"


async def eventually(condition: Callable[[], bool], *, rounds: int = 50) -> None:
    """Let the loop run until ``condition()`` holds (no time passes); fail after ``rounds`` settles."""
    for _ in range(rounds):
        if condition():
            return
        await settle()
    raise AssertionError("condition not reached")
