"""FakeOAuthUser checks a service-account key's JWT-bearer assertion as Google's token endpoint does
(RFC 7523; issue #14: the key inside an impersonated_service_account file): the key named by
``kid`` signed it, ``aud`` is Google's token URL, it lives at most an hour, it asks for a scope."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_tokens import new_rsa_key
from metaemu.testing.fake_oauth_user import GOOGLE_TOKEN_URI, JWT_BEARER_GRANT, FakeOAuthUser
from metaemu.transport import HttpRequest

SA = "key-sa@p.iam.gserviceaccount.com"
CLOUD = "https://www.googleapis.com/auth/cloud-platform"


async def exchange(oauth: FakeOAuthUser, assertion: str) -> tuple[int, dict[str, Any]]:
    reply = await oauth.handle(HttpRequest.form("http://127.0.0.1:1/token",
                                                {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}))
    return reply.status, json.loads(reply.body)


def sign(key_info: dict[str, Any], **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": SA, "aud": GOOGLE_TOKEN_URI, "scope": CLOUD, "iat": now, "exp": now + 3600} | claims
    pem = key_info["private_key"].encode()
    return jwt.encode(payload, serialization.load_pem_private_key(pem, None),  # type: ignore[arg-type]
                      algorithm="RS256", headers={"kid": key_info["private_key_id"]})


@pytest.fixture
def google() -> FakeGoogle:
    return FakeGoogle()


@pytest.fixture
def oauth(google: FakeGoogle) -> FakeOAuthUser:
    return FakeOAuthUser(google=google)


async def test_a_keys_assertion_buys_a_token_for_the_account(oauth: FakeOAuthUser, google: FakeGoogle) -> None:
    status, body = await exchange(oauth, sign(oauth.service_account_key(SA)))
    assert status == 200
    info = google.token_info(body["access_token"])
    assert info is not None and (info.principal, info.scopes) == (f"serviceAccount:{SA}", (CLOUD,))


@pytest.mark.parametrize(("claims", "words"), [
    ({"aud": "http://127.0.0.1:1/token"}, "Failed audience check"),
    ({"exp": int(time.time()) + 7200}, "short-lived token"),
    ({"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, "short-lived token"),
    ({"iss": "other@p.iam.gserviceaccount.com"}, "account not found"),
], ids=["audience", "too-long", "expired", "other-account"])
async def test_assertions_google_refuses_are_invalid_grants(oauth: FakeOAuthUser, claims: dict[str, Any],
                                                            words: str) -> None:
    status, body = await exchange(oauth, sign(oauth.service_account_key(SA), **claims))
    assert (status, body["error"]) == (400, "invalid_grant") and words in body["error_description"]


async def test_an_assertion_signed_by_another_key_is_an_invalid_signature(oauth: FakeOAuthUser) -> None:
    info = oauth.service_account_key(SA)
    forged = info | {"private_key": new_rsa_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()}
    status, body = await exchange(oauth, sign(forged))
    assert (status, body) == (400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})


async def test_an_assertion_without_a_scope_is_refused(oauth: FakeOAuthUser) -> None:
    status, body = await exchange(oauth, sign(oauth.service_account_key(SA), scope=""))
    assert (status, body["error"]) == (400, "invalid_scope")
