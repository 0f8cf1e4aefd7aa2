"""FakeOAuth behaves like ServiceAuthCentral's token endpoint (upstream.md §7, UP-17, UP-18): the
grants it accepts, the claims of what it issues, its error envelope, discovery and JWKS on a socket,
fault injection, and that the fake Google STS accepts its tokens once a provider trusts its JWKS."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

from metaemu.errors import ConfigError
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import GRANT_TYPE as STS_GRANT
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.testing.fake_oauth import (
    DISCOVERY_PATH,
    JWKS_PATH,
    JWT_BEARER_GRANT,
    TOKEN_LIFETIME_S,
    FakeOAuth,
    JwtBearerTrust,
    token_claims,
)
from metaemu.testing.world import AUDIENCE
from metaemu.transport import AiohttpClient, HttpRequest, HttpResponse
from tests.credentials.support import serve

TOKEN_URL = "https://sac.example.test/v1/token"
CLIENT, SECRET, API = "workload-a", "s3cret-value", "api-b"
KUBE_ISSUER = "https://kubernetes.default.svc"
KUBE_SUB = "system:serviceaccount:prod:app"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kube(clock: FakeClock) -> FakeIssuer:
    return FakeIssuer(issuer=KUBE_ISSUER, clock=clock)


@pytest.fixture
def sac(clock: FakeClock, kube: FakeIssuer) -> FakeOAuth:
    sac = FakeOAuth(clock=clock)
    trust = JwtBearerTrust(issuer=KUBE_ISSUER, subject=KUBE_SUB, audience="sac", jwks=kube.jwks())
    sac.add_client(CLIENT, secret=SECRET, jwt_bearer=[trust])
    sac.add_client(API, scopes=["read", "write"])
    sac.authorize(CLIENT, API, scopes=["read"])
    return sac


def form(**fields: str) -> HttpRequest:
    return HttpRequest.form(TOKEN_URL, fields)


def cc(**overrides: str) -> HttpRequest:
    fields = {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET, "audience": API}
    return form(**{k: v for k, v in {**fields, **overrides}.items() if v})


def body(response: HttpResponse) -> Any:
    return json.loads(response.body)


async def test_client_credentials_issue_an_rs256_jwt_with_sacs_claims_up17(sac: FakeOAuth) -> None:
    response = await sac.handle(cc())
    assert response.status == 200
    payload = body(response)
    assert set(payload) == {"access_token", "token_type", "expires_in"}
    assert (payload["token_type"], payload["expires_in"]) == ("Bearer", TOKEN_LIFETIME_S)
    token = payload["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and header["typ"] == "JWT" and header["kid"]
    claims = token_claims(token, sac.jwks(), now=DEFAULT_START)
    assert claims["iss"] == sac.issuer
    assert claims["sub"] == CLIENT
    assert claims["aud"] == API  # a string, not a list (upstream.md §7)
    iat = int(DEFAULT_START.timestamp())
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (iat, iat, iat + TOKEN_LIFETIME_S)
    assert claims["jti"] and "scope" not in claims


async def test_a_requested_scope_is_checked_and_carried_in_the_token(sac: FakeOAuth) -> None:
    ok = await sac.handle(cc(scope="read"))
    assert token_claims(body(ok)["access_token"], sac.jwks(), now=DEFAULT_START)["scope"] == "read"
    denied = await sac.handle(cc(scope="write"))
    assert denied.status == 403
    assert body(denied) == {"error": "invalid_client", "messages": ["The specified scope 'write' is invalid."],
                            "status": 403}


@pytest.mark.parametrize(("overrides", "status", "error", "message"), [
    ({"client_secret": "wrong"}, 401, "access_denied", "The request has invalid 'client_id' or 'client_secret."),
    ({"client_id": "nobody"}, 401, "access_denied", "The request has invalid 'client_id'."),
    ({"audience": "unknown-api"}, 403, "invalid_client", "The specified 'audience' is invalid."),
    ({"audience": CLIENT}, 403, "invalid_client", "The client is not authorized for the specified audience."),
    ({"audience": ""}, 400, "invalid_request", "The request is missing the required parameter 'audience'."),
    ({"client_secret": ""}, 400, "invalid_request",
     "The request is missing the required parameter 'client_secret'."),
    ({"grant_type": "password"}, 400, "invalid_request", "The request 'grant_type' provided is not supported."),
    ({"assertion": "x.y.z"}, 400, "invalid_request", "The request has unexpected parameter 'assertion'."),
])
async def test_refusals_use_sacs_error_envelope_up17(
        sac: FakeOAuth, overrides: dict[str, str], status: int, error: str, message: str) -> None:
    response = await sac.handle(cc(**overrides))
    assert response.status == status
    assert body(response) == {"error": error, "messages": [message], "status": status}
    assert SECRET not in response.body.decode()


async def test_only_form_bodies_are_accepted(sac: FakeOAuth) -> None:
    response = await sac.handle(HttpRequest.json(TOKEN_URL, {"grant_type": "client_credentials"}))
    assert response.status == 415
    assert body(response)["error"] == "invalid_request"


async def test_a_repeated_parameter_is_refused(sac: FakeOAuth) -> None:
    request = HttpRequest(method="POST", url=TOKEN_URL, headers={"Content-Type": "application/x-www-form-urlencoded"},
                          body=urlencode([("grant_type", "client_credentials"), ("audience", API),
                                          ("audience", CLIENT)]).encode())
    assert (await sac.handle(request)).status == 400


async def test_jwt_bearer_accepts_a_projected_kubernetes_token_from_a_trusted_issuer_up18(
        sac: FakeOAuth, kube: FakeIssuer) -> None:
    assertion = kube.mint_kubernetes(namespace="prod", service_account="app", audience="sac")
    response = await sac.handle(form(grant_type=JWT_BEARER_GRANT, client_id=CLIENT, assertion=assertion,
                                     audience=API))
    assert response.status == 200
    assert token_claims(body(response)["access_token"], sac.jwks(), now=DEFAULT_START)["sub"] == CLIENT


async def test_jwt_bearer_rejects_forged_expired_and_unmatched_assertions(
        sac: FakeOAuth, kube: FakeIssuer, clock: FakeClock) -> None:
    forger = FakeIssuer(issuer=KUBE_ISSUER, kid=kube.kid, clock=clock)  # same kid, another key
    cases = {
        "forged": (forger.mint(sub=KUBE_SUB, audience=["sac"]), 403, "Invalid assertion jwt."),
        "expired": (kube.mint(sub=KUBE_SUB, audience="sac", lifetime_s=600,
                              now=DEFAULT_START.replace(hour=4)), 403, "Invalid assertion jwt."),
        "other subject": (kube.mint(sub="system:serviceaccount:prod:other", audience="sac"), 403,
                          "The client no matching jwt-bearer."),
        "other audience": (kube.mint(sub=KUBE_SUB, audience="elsewhere"), 403, "The client no matching jwt-bearer."),
        "not a JWT": ("not-a-jwt", 400, "The request has an invalid 'assertion'."),
    }
    for name, (assertion, status, message) in cases.items():
        response = await sac.handle(form(grant_type=JWT_BEARER_GRANT, client_id=CLIENT, assertion=assertion,
                                         audience=API))
        assert (response.status, body(response)["messages"]) == (status, [message]), name
    details = body(await sac.handle(form(grant_type=JWT_BEARER_GRANT, client_id=CLIENT, audience=API,
                                         assertion=cases["expired"][0])))["details"]
    assert details == "the assertion has expired"


async def test_jwt_bearer_refuses_a_client_secret_and_clients_without_bearer_config(
        sac: FakeOAuth, kube: FakeIssuer) -> None:
    assertion = kube.mint(sub=KUBE_SUB, audience="sac")
    with_secret = await sac.handle(form(grant_type=JWT_BEARER_GRANT, client_id=CLIENT, assertion=assertion,
                                        audience=API, client_secret=SECRET))
    assert body(with_secret)["messages"] == ["The request has unexpected parameter 'client_secret'."]
    no_bearer = await sac.handle(form(grant_type=JWT_BEARER_GRANT, client_id=API, assertion=assertion,
                                      audience=CLIENT))
    assert (no_bearer.status, body(no_bearer)["messages"]) == (403, ["The client not configured for jwt-bearer."])


async def test_client_ids_follow_sacs_input_pattern() -> None:
    sac = FakeOAuth()
    sac.add_client(AUDIENCE)  # //iam.googleapis.com/... is a valid SAC client id (upstream.md §7)
    sac.add_client("https://api.example.com/v1")
    with pytest.raises(ConfigError):
        sac.add_client("has spaces")
    with pytest.raises(ConfigError):
        sac.authorize("nobody", AUDIENCE)


async def test_injected_faults_answer_first_then_the_real_logic(sac: FakeOAuth) -> None:
    sac.fail(status=503, times=2)
    sac.fail(status=500, body="upstream exploded")
    assert [(await sac.handle(cc())).status for _ in range(4)] == [503, 503, 500, 200]
    assert sac.calls["token"] == 4
    sac.garbage()
    garbage = await sac.handle(cc())
    assert garbage.status == 200 and garbage.body.startswith(b"<!DOCTYPE")


async def test_a_stall_holds_requests_until_released(sac: FakeOAuth) -> None:
    event = sac.stall()
    pending = asyncio.ensure_future(sac.handle(cc()))
    await asyncio.sleep(0)
    assert not pending.done() and sac.calls["token"] == 1
    event.set()
    assert (await pending).status == 200


async def test_requests_are_recorded_with_their_form(sac: FakeOAuth) -> None:
    await sac.handle(cc(scope="read"))
    recorded = sac.requests[-1]
    assert recorded.endpoint == "token"
    assert dict(recorded.form) == {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET,
                                   "audience": API, "scope": "read"}
    assert SECRET not in repr(recorded)


async def test_discovery_and_jwks_are_served_on_a_socket_up18() -> None:
    sac = FakeOAuth()
    sac.add_client(CLIENT, secret=SECRET)
    sac.add_client(API)
    sac.authorize(CLIENT, API)
    http = AiohttpClient()
    try:
        async with serve(sac.app()) as base:
            sac.issuer = base
            discovery = json.loads((await http.send(HttpRequest(method="GET", url=base + DISCOVERY_PATH))).body)
            assert discovery["issuer"] == base
            assert discovery["jwks_uri"] == base + JWKS_PATH
            assert discovery["token_endpoint"] == base + "/v1/token"
            jwks = json.loads((await http.send(HttpRequest(method="GET", url=discovery["jwks_uri"]))).body)
            response = await http.send(HttpRequest.form(discovery["token_endpoint"], {
                "grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET, "audience": API}))
            assert response.status == 200
            claims = token_claims(json.loads(response.body)["access_token"], jwks)
            assert claims["iss"] == base
            missing = await http.send(HttpRequest(method="GET", url=base + "/nope"))
            assert missing.status == 404
    finally:
        await http.close()


async def test_the_fake_google_sts_accepts_its_tokens_once_a_provider_trusts_its_jwks(clock: FakeClock) -> None:
    sac = FakeOAuth(clock=clock)
    sac.add_client(CLIENT, secret=SECRET)
    sac.add_client(AUDIENCE)
    sac.authorize(CLIENT, AUDIENCE)
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=sac.issuer, jwks=sac.jwks()))
    token = body(await sac.handle(cc(audience=AUDIENCE)))["access_token"]
    exchange = await google.handle(HttpRequest.form("https://sts.googleapis.test/v1/token", {
        "grant_type": STS_GRANT, "audience": AUDIENCE, "scope": "https://www.googleapis.com/auth/cloud-platform",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token", "subject_token": token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}))
    assert exchange.status == 200, exchange.body
    info = google.token_info(body(exchange)["access_token"])
    assert info is not None and info.principal == google.principal_for(AUDIENCE, CLIENT)
