"""Fixtures for the credential-pipeline tests: everything runs on virtual time.

``world`` overrides the top-level fixture of the same name: the issuer, the fake Google and the
token file all share the ``FakeClock`` the code under test is given, so expiry arithmetic is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metaemu.credentials.sources.file import FileSource
from metaemu.metrics import Metrics, create_metrics
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.world import World, build_world


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def world(tmp_path: Path, clock: FakeClock) -> World:
    return build_world(tmp_path, clock=clock)


@pytest.fixture
def metrics() -> Metrics:
    return create_metrics()


@pytest.fixture
def source(world: World, clock: FakeClock) -> FileSource:
    """The projected service-account token file, as ``type: kubernetes`` configures it."""
    return FileSource.kubernetes(world.token_file, clock=clock)
