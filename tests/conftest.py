from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
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


ROOT = Path(__file__).resolve().parents[1]


def _traversable_by_all(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@pytest.fixture(scope="session")
def image_install() -> Iterator[Path]:
    """metaemu installed the way the image installs it (its wheel into a fresh venv, from the
    hash-checked requirements.lock), in a directory every user can read: what a test runs as
    another uid (65532). Never the checkout's .venv: a checkout under a directory other users
    cannot read (mktemp -d, many CI work dirs) would give them "No module named metaemu"."""
    base = Path(tempfile.gettempdir())
    if not _traversable_by_all(base):
        base = Path("/tmp")
    if not _traversable_by_all(base):
        pytest.fail(f"no temporary directory other users can traverse ({tempfile.gettempdir()}, /tmp): set TMPDIR "
                    "to one, for the tests that run metaemu as uid 65532")
    root = Path(tempfile.mkdtemp(prefix="metaemu-image-", dir=base))
    root.chmod(0o755)
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(root / "wheels"),
                        str(ROOT)], check=True, timeout=300, capture_output=True)
        subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
        pip = str(root / "venv/bin/pip")
        subprocess.run([pip, "install", "-q", "--require-hashes", "-r", str(ROOT / "requirements.lock")],
                       check=True, timeout=600, capture_output=True)
        (wheel,) = (root / "wheels").glob("metaemu-*.whl")
        subprocess.run([pip, "install", "-q", "--no-deps", str(wheel)], check=True, timeout=120, capture_output=True)
        for path in [root, *root.rglob("*")]:  # like an image layer: readable by everyone, owned by root
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IRGRP | stat.S_IROTH
                           | (stat.S_IXGRP | stat.S_IXOTH if path.is_dir() or os.access(path, os.X_OK) else 0))
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
