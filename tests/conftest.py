from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from metaemu.testing.world import World, build_world
from tests.helpers import Mds

if TYPE_CHECKING:
    from tests.kube.cluster import KubeCluster


@pytest.fixture
def world(tmp_path: Path) -> World:
    return build_world(tmp_path)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound but never listening, so
    a connect gets an immediate RST and nothing else can take the port meanwhile (unlike a port
    bound, released and hoped to stay free)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
async def mds_factory() -> AsyncIterator[list[Mds]]:
    clients: list[Mds] = []
    yield clients
    for c in clients:
        await c.close()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """The real test bed (issue #10): one etcd + kube-apiserver per session, with the rendered RBAC
    and admission-policy objects of manifests/node applied as a user applies them (kubectl apply).
    If the binaries cannot be built or the control plane cannot start, every test using it errors
    with the reason. Shared by tests/kube and the node-mode unit tests in tests/pods."""
    from tests.kube.session import running_cluster

    with running_cluster(tmp_path_factory.mktemp("kube")) as kube:
        yield kube


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the real API server carries the ``kube`` marker (``pytest -m kube``)."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kube)
