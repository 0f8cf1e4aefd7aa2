from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metaemu.testing.world import World, build_world
from tests.helpers import Mds


@pytest.fixture
def world(tmp_path: Path) -> World:
    return build_world(tmp_path)


@pytest.fixture
async def mds_factory() -> AsyncIterator[list[Mds]]:
    clients: list[Mds] = []
    yield clients
    for c in clients:
        await c.close()
