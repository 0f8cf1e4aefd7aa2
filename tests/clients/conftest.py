"""Shared fixtures of the real-client tests: a running metaemu backed by the Google stand-in, plus a
storage stand-in, for every real client library to be judged against."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_storage import FakeStorage
from metaemu.testing.world import PROJECT_NUMBER, SERVICE_ACCOUNT, World
from tests.credentials.support import serve
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


@contextlib.asynccontextmanager
async def storage_stand_in(google: FakeGoogle) -> AsyncIterator[tuple[FakeStorage, str]]:
    """The Cloud Storage stand-in the clients read BUCKET/hello.txt from, trusting ``google``'s
    tokens, on a loopback port of its own: (the stand-in, its base URL)."""
    storage = FakeStorage(google, project_number=PROJECT_NUMBER)
    storage.add_bucket(BUCKET)
    storage.add_object(BUCKET, "hello.txt", b"hi")
    async with serve(storage.app()) as url:
        yield storage, url


@pytest.fixture
async def live(world: World) -> AsyncIterator[Live]:
    async with storage_stand_in(world.google) as (storage, url), running_server(world) as server:
        yield Live(server, world, str(server.metadata_address), storage, url)
