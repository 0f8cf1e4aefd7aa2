"""Starting the session's real control plane and applying manifests/node's RBAC and admission
policies to it, as a user installs them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import yaml

from tests.kube.agent import AGENT_NAMESPACE, AGENT_SA, AGENT_USER, POLICY_KINDS, rendered_manifests
from tests.kube.cluster import KubeCluster, binaries_dir


@contextlib.contextmanager
def running_cluster(workdir: Path) -> Iterator[KubeCluster]:
    kube = KubeCluster(bin_dir=binaries_dir(), workdir=workdir)
    kube.start()
    try:
        # As a user installs them: kubectl apply of the rendered objects (all but the workload).
        objects = [obj for obj in rendered_manifests() if obj["kind"] in POLICY_KINDS]
        applied = kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
        assert applied.returncode == 0, applied.stderr
        # A new ValidatingAdmissionPolicy is enforced only once the server's policy informer has
        # compiled it (about a second): wait for the agent's identity to be refused an API-server
        # token, as every test expects from the start.
        kube.wait_until("metaemu-token-request enforced", lambda: kube.token_request(
            AGENT_NAMESPACE, AGENT_SA, {"audiences": ["policy-probe"]}, impersonate=AGENT_USER).status == 403)
        yield kube
    finally:
        kube.stop()
