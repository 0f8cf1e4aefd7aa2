"""The real Kubernetes test bed (issue #10). The session's ``cluster`` fixture is in tests/conftest.py
(the node-mode unit tests of tests/pods share it); every test using it gets the ``kube`` marker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.kube.agent import Agent, started_agent
from tests.kube.cluster import KubeCluster


@pytest.fixture
async def agent(cluster: KubeCluster, tmp_path: Path) -> AsyncIterator[Agent]:
    async with started_agent(cluster, tmp_path) as started:
        yield started
