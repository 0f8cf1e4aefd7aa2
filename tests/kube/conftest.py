"""The real Kubernetes test bed (issue #10): one etcd + kube-apiserver per session, with the rendered
RBAC and admission-policy objects of manifests/node applied as a user applies them (kubectl apply).

Every test module here sets the ``kube`` marker (``pytest -m kube`` runs only them). If the binaries
cannot be built or the control plane cannot start, every one of them errors with the reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from tests.kube.agent import (
    AGENT_NAMESPACE,
    AGENT_SA,
    AGENT_USER,
    POLICY_KINDS,
    Agent,
    rendered_manifests,
    started_agent,
)
from tests.kube.cluster import KubeCluster, binaries_dir


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    kube = KubeCluster(bin_dir=binaries_dir(), workdir=tmp_path_factory.mktemp("kube"))
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


@pytest.fixture
async def agent(cluster: KubeCluster, tmp_path: Path) -> AsyncIterator[Agent]:
    async with started_agent(cluster, tmp_path) as started:
        yield started
