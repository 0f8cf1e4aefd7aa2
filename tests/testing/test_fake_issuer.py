"""FakeIssuer: RS256 tokens with kid, Kubernetes claim shape (upstream.md §6), JWKS and discovery (UP-18)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer

from metaemu.testing.fake_clock import DEFAULT_START, FakeClock
from metaemu.testing.fake_issuer import FakeIssuer

T0 = int(DEFAULT_START.timestamp())
AUDIENCE = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x"


@pytest.fixture
def issuer() -> FakeIssuer:
    return FakeIssuer(issuer="https://issuer.test", kid="key-1", clock=FakeClock())


def verified(issuer: FakeIssuer, token: str, audience: str) -> dict[str, Any]:
    key = jwt.PyJWKSet.from_dict(issuer.jwks())["key-1"]
    claims: dict[str, Any] = jwt.decode(token, key=key, algorithms=["RS256"], audience=audience,
                                        issuer=issuer.issuer, options={"verify_exp": False,
                                                                       "verify_iat": False,
                                                                       "verify_nbf": False})
    return claims


def test_mint_signs_rs256_with_kid_and_standard_claims_from_the_clock(issuer: FakeIssuer) -> None:
    token = issuer.mint(sub="user-1", audience="aud-1", lifetime_s=600)
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": "key-1", "typ": "JWT"}
    claims = verified(issuer, token, "aud-1")
    assert claims["iss"] == "https://issuer.test"
    assert claims["sub"] == "user-1"
    assert claims["aud"] == "aud-1"  # a string audience stays a string
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (T0, T0, T0 + 600)
    assert isinstance(claims["jti"], str)


def test_mint_keeps_a_list_audience_and_honours_an_explicit_now(issuer: FakeIssuer) -> None:
    later = DEFAULT_START + dt.timedelta(hours=2)
    claims = verified(issuer, issuer.mint(sub="s", audience=["a", "b"], now=later), "b")
    assert claims["aud"] == ["a", "b"]
    assert claims["iat"] == T0 + 7200


def test_claims_and_headers_override_and_none_removes(issuer: FakeIssuer) -> None:
    token = issuer.mint(sub="s", audience="a", claims={"sub": None, "email": "e@x"}, headers={"kid": None})
    assert "kid" not in jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "sub" not in claims
    assert claims["email"] == "e@x"


def test_issuer_can_be_reassigned_after_binding(issuer: FakeIssuer) -> None:
    issuer.issuer = "http://127.0.0.1:4321"
    assert verified(issuer, issuer.mint(sub="s", audience="a"), "a")["iss"] == "http://127.0.0.1:4321"
    assert issuer.discovery()["jwks_uri"] == "http://127.0.0.1:4321/openid/v1/jwks"


def test_a_different_key_does_not_verify(issuer: FakeIssuer) -> None:
    forger = FakeIssuer(issuer=issuer.issuer, kid="key-1", clock=FakeClock())
    with pytest.raises(jwt.InvalidSignatureError):
        verified(issuer, forger.mint(sub="s", audience="a"), "a")


def test_mint_kubernetes_has_the_projected_token_claim_shape(issuer: FakeIssuer) -> None:
    token = issuer.mint_kubernetes(namespace="apps", service_account="web", audience=AUDIENCE,
                                   sa_uid="sa-uid", pod_name="web-0", pod_uid="pod-uid", node_name="n1")
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": "key-1"}  # no typ, like kube
    claims = verified(issuer, token, AUDIENCE)
    assert set(claims) == {"aud", "exp", "iat", "nbf", "iss", "sub", "jti", "kubernetes.io"}
    assert claims["aud"] == [AUDIENCE]  # always a list
    assert claims["sub"] == "system:serviceaccount:apps:web"
    assert claims["exp"] - claims["iat"] == 3600
    k8s = claims["kubernetes.io"]
    assert k8s["namespace"] == "apps"
    assert k8s["serviceaccount"] == {"name": "web", "uid": "sa-uid"}
    assert k8s["pod"] == {"name": "web-0", "uid": "pod-uid"}
    assert k8s["node"]["name"] == "n1"


def test_mint_kubernetes_without_a_pod_omits_the_pod_object(issuer: FakeIssuer) -> None:
    claims = verified(issuer, issuer.mint_kubernetes(namespace="ns", service_account="sa",
                                                     audience=["x", AUDIENCE]), AUDIENCE)
    assert claims["aud"] == ["x", AUDIENCE]
    assert set(claims["kubernetes.io"]) == {"namespace", "serviceaccount"}


def test_jwks_publishes_one_rs256_signing_key(issuer: FakeIssuer) -> None:
    (key,) = issuer.jwks()["keys"]
    assert {key["kty"], key["kid"], key["alg"], key["use"]} == {"RSA", "key-1", "RS256", "sig"}
    assert "d" not in key  # public half only


@pytest.fixture
async def served(issuer: FakeIssuer) -> AsyncIterator[str]:
    async with TestServer(issuer.app(), host="127.0.0.1") as server:
        issuer.issuer = str(server.make_url("")).rstrip("/")
        yield issuer.issuer


async def test_serves_discovery_and_jwks_like_a_kube_apiserver(issuer: FakeIssuer, served: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{served}/.well-known/openid-configuration") as resp:
            assert resp.status == 200
            discovery = await resp.json()
        async with session.get(discovery["jwks_uri"]) as resp:
            assert resp.status == 200
            jwks = await resp.json(content_type=None)
    assert discovery == {"issuer": served, "jwks_uri": f"{served}/openid/v1/jwks",
                         "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                         "id_token_signing_alg_values_supported": ["RS256"]}
    assert jwks == issuer.jwks()
    # PyJWKClient is how a real relying party would fetch it.
    client = jwt.PyJWKClient(discovery["jwks_uri"])
    token = issuer.mint(sub="s", audience="a")
    signing_key = await asyncio.to_thread(client.get_signing_key_from_jwt, token)
    assert signing_key.key_id == "key-1"
