"""FakeGoogle as IAM Credentials: auth, grants and bodies as upstream.md §2 describes (UP-05, UP-06, UP-07)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE
from metaemu.errors import ConfigError
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import GRANT_TYPE, WorkloadIdentityProvider
from metaemu.testing.fake_google_tokens import new_rsa_key
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.transport import HttpRequest, HttpResponse

POOL = "projects/123456789012/locations/global/workloadIdentityPools/pool-1"
AUDIENCE = f"//iam.googleapis.com/{POOL}/providers/kube"
ISSUER = "https://kube.test"
SA = "app@my-proj.iam.gserviceaccount.com"
IAM_BASE = "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts"
IAM_SCOPE = "https://www.googleapis.com/auth/iam"
CLOUD_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
KSA_SUB = "system:serviceaccount:apps:web"


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return new_rsa_key()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuer(clock: FakeClock, issuer_key: rsa.RSAPrivateKey) -> FakeIssuer:
    return FakeIssuer(issuer=ISSUER, kid="kid-1", clock=clock, private_key=issuer_key)


@pytest.fixture
def google(clock: FakeClock, issuer: FakeIssuer) -> FakeGoogle:
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=issuer.jwks()))
    google.add_service_account(SA, unique_id="111111111111111111111")
    google.grant(SA, google.principal_for(AUDIENCE, KSA_SUB))
    return google


async def federated(google: FakeGoogle, issuer: FakeIssuer, *, sub: str = KSA_SUB, scope: str = IAM_SCOPE) -> str:
    form = {"grant_type": GRANT_TYPE, "audience": AUDIENCE, "scope": scope,
            "requested_token_type": ACCESS_TOKEN_TYPE, "subject_token": issuer.mint(sub=sub, audience=[AUDIENCE]),
            "subject_token_type": JWT_TOKEN_TYPE}
    response = await google.handle(HttpRequest.form("https://sts.googleapis.com/v1/token", form))
    assert response.status == 200
    token: str = response.decoded()["access_token"]
    return token


async def call(google: FakeGoogle, method: str, body: Any, *, token: str | None, account: str = SA) -> HttpResponse:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await google.handle(HttpRequest.json(f"{IAM_BASE}/{account}:{method}", body, headers=headers))


def rpc_error(response: HttpResponse, code: int) -> dict[str, Any]:
    assert response.status == code
    body = response.decoded()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    return error


ACCESS_BODY = {"delegates": None, "scope": [CLOUD_SCOPE], "lifetime": "1800s"}  # google-auth's shape


async def test_generates_an_access_token_with_a_whole_second_expire_time(
        google: FakeGoogle, issuer: FakeIssuer) -> None:
    response = await call(google, "generateAccessToken", ACCESS_BODY, token=await federated(google, issuer))
    assert response.status == 200
    body = response.decoded()
    assert set(body) == {"accessToken", "expireTime"}
    assert body["accessToken"].startswith("ya29.sa-")
    assert body["expireTime"] == "2026-11-22T05:30:00Z"
    info = google.token_info(body["accessToken"])
    assert info is not None
    assert (info.kind, info.email, info.scopes) == ("service_account", SA, (CLOUD_SCOPE,))
    assert google.calls["generateAccessToken"] == 1


async def test_expire_time_has_no_fraction_even_when_the_clock_has_one(issuer: FakeIssuer) -> None:
    clock = FakeClock(start=DEFAULT_START + dt.timedelta(microseconds=654321))
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=issuer.jwks()))
    google.add_service_account(SA)
    google.grant(SA, google.principal_for(AUDIENCE, KSA_SUB))
    body = {"scope": [CLOUD_SCOPE]}  # lifetime defaults to 3600s
    response = await call(google, "generateAccessToken", body, token=await federated(google, issuer))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", response.decoded()["expireTime"])
    assert response.decoded()["expireTime"] == "2026-11-22T06:00:00Z"


@pytest.mark.parametrize(("headers", "reason"), [
    ({}, "CREDENTIALS_MISSING"),
    ({"Authorization": "Bearer ya29.never-issued"}, "ACCESS_TOKEN_TYPE_UNSUPPORTED"),
    ({"Authorization": "Basic dTpw"}, "ACCESS_TOKEN_TYPE_UNSUPPORTED"),
], ids=["no header", "unknown bearer", "not bearer"])
async def test_bad_bearer_is_401_unauthenticated(
        google: FakeGoogle, headers: dict[str, str], reason: str) -> None:
    request = HttpRequest.json(f"{IAM_BASE}/{SA}:generateAccessToken", ACCESS_BODY, headers=headers)
    error = rpc_error(await google.handle(request), 401)
    assert error["status"] == "UNAUTHENTICATED"
    assert error["details"][0]["reason"] == reason


async def test_an_expired_federated_token_is_401(google: FakeGoogle, issuer: FakeIssuer, clock: FakeClock) -> None:
    token = await federated(google, issuer)
    clock.advance(3600)
    error = rpc_error(await call(google, "generateAccessToken", ACCESS_BODY, token=token), 401)
    assert error["details"][0]["reason"] == "ACCESS_TOKEN_EXPIRED"


async def test_a_token_without_iam_scope_is_403(google: FakeGoogle, issuer: FakeIssuer) -> None:
    token = await federated(google, issuer, scope="https://www.googleapis.com/auth/devstorage.read_only")
    error = rpc_error(await call(google, "generateAccessToken", ACCESS_BODY, token=token), 403)
    assert error["details"][0]["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"


async def test_cloud_platform_scope_suffices(google: FakeGoogle, issuer: FakeIssuer) -> None:
    token = await federated(google, issuer, scope=CLOUD_SCOPE)
    assert (await call(google, "generateAccessToken", ACCESS_BODY, token=token)).status == 200


@pytest.mark.parametrize(("method", "body", "permission"), [
    ("generateAccessToken", ACCESS_BODY, "iam.serviceAccounts.getAccessToken"),
    ("generateIdToken", {"audience": "https://svc"}, "iam.serviceAccounts.getOpenIdToken"),
])
async def test_missing_grant_is_exactly_the_permission_denied_envelope(
        google: FakeGoogle, issuer: FakeIssuer, method: str, body: Any, permission: str) -> None:
    token = await federated(google, issuer, sub="system:serviceaccount:apps:intruder")
    response = await call(google, method, body, token=token)
    assert response.status == 403
    assert response.decoded() == {"error": {
        "code": 403, "message": f"Permission '{permission}' denied on resource (or it may not exist).",
        "status": "PERMISSION_DENIED",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "IAM_PERMISSION_DENIED",
                     "domain": "iam.googleapis.com", "metadata": {"permission": permission}}]}}


async def test_revoking_the_grant_denies_the_next_call(google: FakeGoogle, issuer: FakeIssuer) -> None:
    token = await federated(google, issuer)
    google.revoke(SA, google.principal_for(AUDIENCE, KSA_SUB))
    rpc_error(await call(google, "generateAccessToken", ACCESS_BODY, token=token), 403)


async def test_a_principal_set_grant_covers_the_whole_pool(google: FakeGoogle, issuer: FakeIssuer) -> None:
    google.grant(SA, f"principalSet://iam.googleapis.com/{POOL}/*")
    token = await federated(google, issuer, sub="anyone")
    assert (await call(google, "generateAccessToken", ACCESS_BODY, token=token)).status == 200


async def test_unknown_service_account_is_404(google: FakeGoogle, issuer: FakeIssuer) -> None:
    response = await call(google, "generateAccessToken", ACCESS_BODY, token=await federated(google, issuer),
                          account="ghost%40my-proj.iam.gserviceaccount.com")
    error = rpc_error(response, 404)
    assert error["status"] == "NOT_FOUND"
    assert "ghost@my-proj.iam.gserviceaccount.com" in error["message"]


async def test_the_account_can_be_named_by_unique_id(google: FakeGoogle, issuer: FakeIssuer) -> None:
    response = await call(google, "generateAccessToken", ACCESS_BODY, token=await federated(google, issuer),
                          account="111111111111111111111")
    assert response.status == 200


@pytest.mark.parametrize(("body", "field"), [
    ({"scope": [CLOUD_SCOPE], "lifetime": "3601s"}, "lifetime"),
    ({"scope": [CLOUD_SCOPE], "lifetime": "0s"}, "lifetime"),
    ({"scope": [CLOUD_SCOPE], "lifetime": "1h"}, "lifetime"),
    ({"scope": [CLOUD_SCOPE], "lifetime": 3600}, "lifetime"),
    ({"scope": []}, "scope"),
    ({"lifetime": "60s"}, "scope"),
    ({"scope": [CLOUD_SCOPE], "delegates": "sa@x"}, "delegates"),
    ({"scope": [CLOUD_SCOPE], "delegates": ["sa@x"]}, "delegates"),
], ids=["lifetime over 3600s", "zero lifetime", "lifetime not a duration", "lifetime a number",
        "empty scope", "no scope", "delegates not a list", "delegate not a resource name"])
async def test_invalid_access_token_bodies_are_400(
        google: FakeGoogle, issuer: FakeIssuer, body: dict[str, Any], field: str) -> None:
    error = rpc_error(await call(google, "generateAccessToken", body, token=await federated(google, issuer)), 400)
    assert (error["status"], error["message"]) == ("INVALID_ARGUMENT", "Request contains an invalid argument.")
    assert error["details"][0]["fieldViolations"][0]["field"] == field


async def test_unknown_fields_and_non_json_are_400(google: FakeGoogle, issuer: FakeIssuer) -> None:
    token = await federated(google, issuer)
    error = rpc_error(await call(google, "generateAccessToken", {**ACCESS_BODY, "scopes": []}, token=token), 400)
    assert error["message"] == 'Invalid JSON payload received. Unknown name "scopes": Cannot find field.'
    request = HttpRequest(method="POST", url=f"{IAM_BASE}/{SA}:generateAccessToken", body=b"{oops",
                          headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    rpc_error(await google.handle(request), 400)


async def test_delegation_needs_a_grant_at_every_hop(google: FakeGoogle, issuer: FakeIssuer) -> None:
    hop = "hop@my-proj.iam.gserviceaccount.com"
    google.add_service_account(hop)
    google.grant(hop, google.principal_for(AUDIENCE, KSA_SUB))
    google.revoke(SA, google.principal_for(AUDIENCE, KSA_SUB))
    token = await federated(google, issuer)
    body = {"delegates": [f"projects/-/serviceAccounts/{hop}"], "scope": [CLOUD_SCOPE]}
    rpc_error(await call(google, "generateAccessToken", body, token=token), 403)
    google.grant(SA, f"serviceAccount:{hop}")
    assert (await call(google, "generateAccessToken", body, token=token)).status == 200


def test_grants_need_a_registered_account(google: FakeGoogle) -> None:
    with pytest.raises(ConfigError, match="not registered"):
        google.grant("nobody@x.iam.gserviceaccount.com", "principal://x")


@pytest.mark.parametrize("include_email", [True, False])
async def test_id_token_verifies_against_google_jwks(
        google: FakeGoogle, issuer: FakeIssuer, include_email: bool) -> None:
    body = {"audience": "https://svc.example", "delegates": None, "includeEmail": include_email}
    response = await call(google, "generateIdToken", body, token=await federated(google, issuer))
    assert response.status == 200
    assert set(response.decoded()) == {"token"}
    token = response.decoded()["token"]
    key = jwt.PyJWKSet.from_dict(google.google_jwks())[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key=key, algorithms=["RS256"], audience="https://svc.example",
                        issuer="https://accounts.google.com", options={"verify_exp": False, "verify_iat": False})
    iat = int(DEFAULT_START.timestamp())
    expected = {"iss": "https://accounts.google.com", "aud": "https://svc.example", "azp": "111111111111111111111",
                "sub": "111111111111111111111", "iat": iat, "exp": iat + 3600}
    if include_email:
        expected |= {"email": SA, "email_verified": True}
    assert claims == expected


@pytest.mark.parametrize("body", [{}, {"audience": ""}, {"audience": "a", "includeEmail": "yes"}],
                         ids=["no audience", "empty audience", "includeEmail not a bool"])
async def test_invalid_id_token_bodies_are_400(google: FakeGoogle, issuer: FakeIssuer, body: dict[str, Any]) -> None:
    rpc_error(await call(google, "generateIdToken", body, token=await federated(google, issuer)), 400)


async def test_a_service_account_token_can_call_iam_as_that_account(google: FakeGoogle, issuer: FakeIssuer) -> None:
    other = "other@my-proj.iam.gserviceaccount.com"
    google.add_service_account(other)
    google.grant(other, f"serviceAccount:{SA}")
    sa_body = {"scope": [IAM_SCOPE]}
    sa_token = (await call(google, "generateAccessToken", sa_body, token=await federated(google, issuer))).decoded()
    response = await call(google, "generateIdToken", {"audience": "a"}, token=sa_token["accessToken"], account=other)
    assert response.status == 200


async def test_a_disabled_account_is_400_failed_precondition_for_a_permitted_caller_only(
        google: FakeGoogle, issuer: FakeIssuer) -> None:
    google.disable_service_account(SA)
    permitted = await federated(google, issuer)
    error = rpc_error(await call(google, "generateAccessToken", ACCESS_BODY, token=permitted), 400)
    assert error == {"code": 400, "message": "Precondition check failed.", "status": "FAILED_PRECONDITION"}
    stranger = await federated(google, issuer, sub="system:serviceaccount:apps:other")
    assert rpc_error(await call(google, "generateAccessToken", ACCESS_BODY, token=stranger), 403)["status"] == (
        "PERMISSION_DENIED")
    google.disable_service_account(SA, disabled=False)
    assert (await call(google, "generateAccessToken", ACCESS_BODY, token=await federated(google, issuer))).status == 200
