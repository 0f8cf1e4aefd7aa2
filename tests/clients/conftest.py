"""Shared fixtures of the real-client tests: a running metaemu backed by the Google stand-in, plus a
storage stand-in, for every real client library to be judged against."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web

from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_storage import FakeStorage
from metaemu.testing.world import PROJECT_NUMBER, SERVICE_ACCOUNT, World
from tests.helpers import running_server

AUDIENCE = "https://example.test/aud"
BUCKET = "metaemu-bucket"
PYTHON_CLIENT = Path(__file__).with_name("python_client.py")


@dataclass
class Live:
    server: MetaemuServer
    world: World
    addr: str
    storage: FakeStorage
    storage_url: str

    def current_token(self) -> str:
        creds = self.server.components.credentials
        token = creds.access.peek(creds.default_scopes)
        assert token is not None
        return token.value

    def verify_id_token(self, token: str, *, email: bool) -> dict[str, Any]:
        key = jwt.PyJWKSet.from_dict(self.world.google.google_jwks()).keys[0]
        claims: dict[str, Any] = jwt.decode(token, key, algorithms=["RS256"], audience=AUDIENCE,
                                            issuer="https://accounts.google.com")
        assert ("email" in claims) == email
        if email:
            assert claims["email"] == SERVICE_ACCOUNT
        return claims


@pytest.fixture
async def live(world: World) -> AsyncIterator[Live]:
    storage = FakeStorage(world.google, project_number=PROJECT_NUMBER)
    storage.add_bucket(BUCKET)
    storage.add_object(BUCKET, "hello.txt", b"hi")
    runner = web.AppRunner(storage.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with running_server(world) as server:
            yield Live(server, world, str(server.metadata_address), storage,
                       f"http://127.0.0.1:{runner.addresses[0][1]}")
    finally:
        await runner.cleanup()
