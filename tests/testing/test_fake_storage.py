"""FakeStorage: the GCS JSON API accepts only live tokens that FakeGoogle issued with a storage scope."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import GRANT_TYPE, WorkloadIdentityProvider
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.testing.fake_storage import FakeStorage
from metaemu.transport import HttpRequest, HttpResponse

AUDIENCE = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/pool-1/providers/kube"
CLOUD_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
BASE = "https://storage.googleapis.com/storage/v1/b"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def google(clock: FakeClock) -> FakeGoogle:
    return FakeGoogle(clock=clock)


@pytest.fixture
def storage(google: FakeGoogle) -> FakeStorage:
    storage = FakeStorage(google)
    storage.add_object("data", "logs/a.txt", b"hello", content_type="text/plain")
    storage.add_object("data", "logs/b.txt", b"")
    storage.add_object("data", "readme.md", b"# hi")
    storage.add_bucket("empty")
    return storage


async def access_token(google: FakeGoogle, clock: FakeClock, scope: str = CLOUD_SCOPE) -> str:
    issuer = FakeIssuer(issuer="https://kube.test", clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=issuer.issuer, jwks=issuer.jwks()))
    response = await google.handle(HttpRequest.form("https://sts.googleapis.com/v1/token", {
        "grant_type": GRANT_TYPE, "audience": AUDIENCE, "scope": scope, "requested_token_type": ACCESS_TOKEN_TYPE,
        "subject_token": issuer.mint(sub="s", audience=AUDIENCE), "subject_token_type": JWT_TOKEN_TYPE}))
    token: str = response.decoded()["access_token"]
    return token


async def get(storage: FakeStorage, path: str, token: str | None) -> HttpResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await storage.client().send(HttpRequest(method="GET", url=f"{BASE}/{path}", headers=headers))


def gcs_error(response: HttpResponse, code: int, reason: str) -> dict[str, Any]:
    assert response.status == code
    error: dict[str, Any] = response.decoded()["error"]
    assert (error["code"], error["errors"][0]["reason"]) == (code, reason)
    return error


async def test_lists_objects_for_a_live_token(storage: FakeStorage, google: FakeGoogle, clock: FakeClock) -> None:
    token = await access_token(google, clock)
    response = await get(storage, "data/o", token)
    assert response.status == 200
    listing = response.decoded()
    assert listing["kind"] == "storage#objects"
    assert [o["name"] for o in listing["items"]] == ["logs/a.txt", "logs/b.txt", "readme.md"]
    first = listing["items"][0]
    assert (first["kind"], first["bucket"], first["size"], first["contentType"]) == (
        "storage#object", "data", "5", "text/plain")
    assert first["md5Hash"] == "XUFAKrxLKna5cZ2REBfFkg=="
    assert storage.seen_tokens == [token]


async def test_honours_prefix_and_omits_items_when_empty(
        storage: FakeStorage, google: FakeGoogle, clock: FakeClock) -> None:
    token = await access_token(google, clock)
    listed = (await get(storage, "data/o?prefix=logs/", token)).decoded()
    assert [o["name"] for o in listed["items"]] == ["logs/a.txt", "logs/b.txt"]
    assert (await get(storage, "empty/o", token)).decoded() == {"kind": "storage#objects"}


async def test_gets_bucket_metadata(storage: FakeStorage, google: FakeGoogle, clock: FakeClock) -> None:
    bucket = (await get(storage, "data", await access_token(google, clock))).decoded()
    assert (bucket["kind"], bucket["name"], bucket["timeCreated"]) == (
        "storage#bucket", "data", "2026-11-22T05:00:00.000Z")


async def test_without_a_token_is_401(storage: FakeStorage) -> None:
    error = gcs_error(await get(storage, "data/o", None), 401, "required")
    assert "storage.objects.list" in error["message"]
    assert storage.seen_tokens == []


async def test_an_unknown_token_is_401_and_recorded(storage: FakeStorage) -> None:
    gcs_error(await get(storage, "data", "ya29.made-up"), 401, "authError")
    assert storage.seen_tokens == ["ya29.made-up"]


async def test_an_expired_token_is_401(storage: FakeStorage, google: FakeGoogle, clock: FakeClock) -> None:
    token = await access_token(google, clock)
    clock.advance(3600)
    gcs_error(await get(storage, "data/o", token), 401, "authError")


async def test_a_token_without_a_storage_scope_is_403(
        storage: FakeStorage, google: FakeGoogle, clock: FakeClock) -> None:
    token = await access_token(google, clock, scope="https://www.googleapis.com/auth/iam")
    gcs_error(await get(storage, "data/o", token), 403, "forbidden")


async def test_an_unknown_bucket_is_404(storage: FakeStorage, google: FakeGoogle, clock: FakeClock) -> None:
    gcs_error(await get(storage, "nope/o", await access_token(google, clock)), 404, "notFound")


async def test_serves_over_a_loopback_socket(storage: FakeStorage, google: FakeGoogle, clock: FakeClock) -> None:
    token = await access_token(google, clock)
    async with TestServer(storage.app(), host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        resp = await session.get(server.make_url("/storage/v1/b/data/o"),
                                 headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200
        listing = await resp.json()
    assert len(listing["items"]) == 3
    assert listing["items"][0]["selfLink"].startswith("http://127.0.0.1:")
