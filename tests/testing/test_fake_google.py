"""FakeGoogle as a whole: routing, recording, fault injection, both transports, and google-auth as an
oracle (upstream.md §9, §10.2; UP-01, UP-02, UP-06)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import exceptions as google_auth_errors
from google.auth import identity_pool
from google.auth.transport.requests import Request as GoogleAuthRequest

from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import GRANT_TYPE, WorkloadIdentityProvider
from metaemu.testing.fake_google_tokens import new_rsa_key
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.transport import HttpRequest, TransportFailure

AUDIENCE = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/pool-1/providers/kube"
ISSUER = "https://kube.test"
SA = "app@my-proj.iam.gserviceaccount.com"
STS_URL = "https://sts.googleapis.com/v1/token"
IAM_SCOPE = "https://www.googleapis.com/auth/iam"
CLOUD_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return new_rsa_key()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def trusting_google(issuer: FakeIssuer, clock: FakeClock | None) -> FakeGoogle:
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=issuer.jwks()))
    google.add_service_account(SA)
    google.grant(SA, google.principal_for(AUDIENCE, "system:serviceaccount:apps:web"))
    return google


@pytest.fixture
def issuer(clock: FakeClock, issuer_key: rsa.RSAPrivateKey) -> FakeIssuer:
    return FakeIssuer(issuer=ISSUER, kid="kid-1", clock=clock, private_key=issuer_key)


@pytest.fixture
def google(clock: FakeClock, issuer: FakeIssuer) -> FakeGoogle:
    return trusting_google(issuer, clock)


def sts_request(issuer: FakeIssuer, *, scope: str = IAM_SCOPE) -> HttpRequest:
    token = issuer.mint_kubernetes(namespace="apps", service_account="web", audience=AUDIENCE)
    return HttpRequest.form(STS_URL, {
        "grant_type": GRANT_TYPE, "audience": AUDIENCE, "scope": scope, "requested_token_type": ACCESS_TOKEN_TYPE,
        "subject_token": token, "subject_token_type": JWT_TOKEN_TYPE})


def iam_request(token: str) -> HttpRequest:
    return HttpRequest.json(f"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{SA}"
                            ":generateAccessToken", {"scope": [CLOUD_SCOPE]},
                            headers={"Authorization": f"Bearer {token}"})


async def test_records_each_call_with_its_parsed_body(google: FakeGoogle, issuer: FakeIssuer) -> None:
    response = await google.handle(sts_request(issuer))
    await google.handle(iam_request(response.decoded()["access_token"]))
    assert google.calls == {"sts": 1, "generateAccessToken": 1}
    sts, iam = google.requests
    assert (sts.endpoint, sts.method, sts.path, sts.account) == ("sts", "POST", "/v1/token", None)
    assert sts.form["scope"] == IAM_SCOPE
    assert sts.headers["content-type"] == "application/x-www-form-urlencoded"  # case-insensitive
    assert (iam.endpoint, iam.account, iam.json) == ("generateAccessToken", SA, {"scope": [CLOUD_SCOPE]})
    assert "Bearer" not in repr(iam)  # secrets stay out of repr


async def test_routes_on_the_path_whatever_the_base_url(google: FakeGoogle, issuer: FakeIssuer) -> None:
    request = sts_request(issuer)
    moved = HttpRequest(method="POST", url="http://127.0.0.1:9/v1/token", headers=request.headers,
                        body=request.body)
    assert (await google.handle(moved)).status == 200


@pytest.mark.parametrize(("method", "url"), [
    ("GET", "https://sts.googleapis.com/v1/token"),
    ("POST", "https://sts.googleapis.com/v1beta/token"),
    ("POST", "https://iamcredentials.googleapis.com/v1/projects/p/serviceAccounts/a@b:generateAccessToken"),
    ("POST", "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/a@b:signBlob"),
])
async def test_unknown_routes_are_404_and_counted(google: FakeGoogle, method: str, url: str) -> None:
    response = await google.handle(HttpRequest(method=method, url=url))
    assert response.status == 404
    assert response.decoded()["error"]["status"] == "NOT_FOUND"
    assert google.calls["unknown"] == 1


async def test_fail_answers_the_next_calls_then_recovers(google: FakeGoogle, issuer: FakeIssuer) -> None:
    google.fail("sts", status=503, times=2)
    statuses = [(await google.handle(sts_request(issuer))).status for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert google.calls["sts"] == 3


@pytest.mark.parametrize(("backend", "status", "expected"), [
    ("sts", 400, {"error": "invalid_request",
                  "error_description": "The request is missing a required parameter or is malformed."}),
    ("sts", 429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}),
    ("iam", 500, {"error": {"code": 500, "status": "INTERNAL"}}),
])
async def test_fail_defaults_to_a_realistic_google_error(
        google: FakeGoogle, issuer: FakeIssuer, backend: Any, status: int, expected: dict[str, Any]) -> None:
    google.fail(backend, status=status)
    request = sts_request(issuer) if backend == "sts" else iam_request("ya29.x")
    response = await google.handle(request)
    assert response.status == status
    body = response.decoded()
    if "error_description" in expected:
        assert body == expected
    else:
        assert {k: body["error"][k] for k in ("code", "status")} == expected["error"]


async def test_fail_sends_a_given_body_and_headers(google: FakeGoogle) -> None:
    google.fail("iam", status=429, body={"error": {"code": 429}}, headers={"Retry-After": "7"})
    response = await google.handle(iam_request("ya29.anything"))
    assert (response.status, response.decoded(), response.headers["Retry-After"]) == (429, {"error": {"code": 429}},
                                                                                      "7")


async def test_garbage_answers_200_with_a_non_json_body(google: FakeGoogle, issuer: FakeIssuer) -> None:
    google.garbage("sts")
    response = await google.handle(sts_request(issuer))
    assert response.status == 200
    assert isinstance(response.decoded(), str)
    assert (await google.handle(sts_request(issuer))).decoded()["token_type"] == "Bearer"


async def test_stall_holds_calls_until_released(google: FakeGoogle, issuer: FakeIssuer) -> None:
    release = google.stall("sts")
    call = asyncio.create_task(google.handle(sts_request(issuer)))
    await settle()
    assert google.calls["sts"] == 1  # counted on arrival
    assert not call.done()
    release.set()
    assert (await call).status == 200
    google.stall("sts")
    second = asyncio.create_task(google.handle(sts_request(issuer)))
    await settle()
    assert not second.done()
    google.unstall("sts")
    assert (await second).status == 200


async def test_injected_latency_delays_each_answer_of_its_backend_on_the_clock(
        issuer: FakeIssuer, clock: FakeClock) -> None:
    google = FakeGoogle(clock=clock, latency_s={"sts": 0.3, "iam": 0.3})
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=issuer.jwks()))
    google.add_service_account(SA)
    google.grant(SA, google.principal_for(AUDIENCE, "system:serviceaccount:apps:web"))
    calls = [asyncio.create_task(google.handle(sts_request(issuer))) for _ in range(2)]
    await clock.wait_for_sleepers(2)
    assert google.calls["sts"] == 2  # counted on arrival, delayed side by side
    clock.advance(0.29)
    await settle()
    assert not any(c.done() for c in calls)
    clock.advance(0.01)
    exchanged = [await c for c in calls]
    assert [r.status for r in exchanged] == [200, 200]
    iam = asyncio.create_task(google.handle(iam_request(exchanged[0].decoded()["access_token"])))
    await clock.wait_for_sleepers(1)
    clock.advance(0.3)
    assert (await iam).status == 200


def test_latency_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="latency_s"):
        FakeGoogle(latency_s={"iam": -0.1})


async def test_in_process_client_times_out_a_stall_on_the_fake_clock(
        google: FakeGoogle, issuer: FakeIssuer, clock: FakeClock) -> None:
    google.stall("sts")
    request = sts_request(issuer)
    call = asyncio.create_task(google.client(clock=clock).send(request))
    await clock.wait_for_sleepers(1)
    clock.advance(request.timeout_s)
    with pytest.raises(TransportFailure, match="no response within"):
        await call
    google.unstall("sts")


async def test_serves_the_same_logic_over_a_loopback_socket(google: FakeGoogle, issuer: FakeIssuer) -> None:
    request = sts_request(issuer)
    async with TestServer(google.app(), host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        url = server.make_url("/v1/token")
        async with session.post(url, headers=dict(request.headers), data=request.body) as ok:
            ok_status, ok_type = ok.status, ok.headers["Content-Type"]
        async with session.post(url, headers=dict(request.headers), data=b"") as denied:
            denied_body = await denied.json()
    assert (ok_status, ok_type) == (200, "application/json; charset=UTF-8")
    assert (denied.status, denied_body["error"]) == (400, "unsupported_grant_type")
    assert google.requests[0].form["audience"] == AUDIENCE


# -- google-auth as a conformance oracle --------------------------------------------------------


class _Supplier:
    """google.auth.identity_pool.SubjectTokenSupplier, duck-typed."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.calls = 0

    def get_subject_token(self, context: Any, request: Any) -> str:
        self.calls += 1
        return self.token


class _RefuseAdapter(requests.adapters.BaseAdapter):
    """SECURITY: a test must never reach real Google; anything but loopback http fails loudly."""

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        raise requests.ConnectionError(f"non-loopback request refused: {request.url}")

    def close(self) -> None:
        pass


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeGoogle, FakeIssuer, str]]:
    issuer = FakeIssuer(issuer=ISSUER, kid="kid-1")  # real clock: google-auth computes expiry with it
    google = trusting_google(issuer, None)
    async with TestServer(google.app(), host="127.0.0.1") as server:
        yield google, issuer, str(server.make_url("")).rstrip("/")


def _refresh(credentials: Any) -> None:
    session = requests.Session()
    session.trust_env = False  # no proxies from the environment
    session.mount("https://", _RefuseAdapter())
    credentials.refresh(GoogleAuthRequest(session))


def _credentials(base: str, supplier: _Supplier, *, impersonate: bool) -> Any:
    extra = {"service_account_impersonation_url":
             f"{base}/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"} if impersonate else {}
    # google-auth ships py.typed but leaves this constructor unannotated.
    return identity_pool.Credentials(  # type: ignore[no-untyped-call]
        audience=AUDIENCE, subject_token_type=JWT_TOKEN_TYPE, token_url=f"{base}/v1/token",
        subject_token_supplier=supplier, scopes=[CLOUD_SCOPE], **extra)


async def test_google_auth_exchanges_a_token_with_the_fake(served: tuple[FakeGoogle, FakeIssuer, str]) -> None:
    google, issuer, base = served
    supplier = _Supplier(issuer.mint_kubernetes(namespace="apps", service_account="web", audience=AUDIENCE))
    credentials = _credentials(base, supplier, impersonate=False)
    await asyncio.to_thread(_refresh, credentials)
    assert credentials.token.startswith("ya29.fed-")
    assert google.calls == {"sts": 1}
    (sts,) = google.requests
    assert list(sts.form) == ["grant_type", "audience", "scope", "requested_token_type", "subject_token",
                              "subject_token_type"]  # upstream.md §1.4
    assert sts.form["scope"] == CLOUD_SCOPE
    assert "Authorization" not in sts.headers


async def test_google_auth_impersonates_through_the_fake(served: tuple[FakeGoogle, FakeIssuer, str]) -> None:
    google, issuer, base = served
    supplier = _Supplier(issuer.mint_kubernetes(namespace="apps", service_account="web", audience=AUDIENCE))
    credentials = _credentials(base, supplier, impersonate=True)
    await asyncio.to_thread(_refresh, credentials)
    assert credentials.token.startswith("ya29.sa-")  # google-auth parsed our whole-second expireTime
    assert credentials.expiry is not None
    sts, iam = google.requests
    assert sts.form["scope"] == IAM_SCOPE  # UP-02: STS scope forced to iam when impersonating
    assert iam.json == {"delegates": None, "scope": [CLOUD_SCOPE], "lifetime": "3600s"}
    info = google.token_info(credentials.token)
    assert info is not None
    assert info.email == SA


@pytest.mark.parametrize("impersonate", [False, True])
async def test_google_auth_fails_with_a_tampered_token(
        served: tuple[FakeGoogle, FakeIssuer, str], impersonate: bool) -> None:
    google, issuer, base = served
    header, payload, signature = issuer.mint_kubernetes(namespace="apps", service_account="web",
                                                        audience=AUDIENCE).split(".")
    tampered = ".".join([header, payload, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")])
    credentials = _credentials(base, _Supplier(tampered), impersonate=impersonate)
    with pytest.raises(google_auth_errors.OAuthError, match="invalid_grant"):
        await asyncio.to_thread(_refresh, credentials)
    assert google.calls == {"sts": 1}


async def test_google_auth_surfaces_a_missing_grant(served: tuple[FakeGoogle, FakeIssuer, str]) -> None:
    google, issuer, base = served
    google.revoke(SA, google.principal_for(AUDIENCE, "system:serviceaccount:apps:web"))
    supplier = _Supplier(issuer.mint_kubernetes(namespace="apps", service_account="web", audience=AUDIENCE))
    with pytest.raises(google_auth_errors.RefreshError, match="PERMISSION_DENIED"):
        await asyncio.to_thread(_refresh, _credentials(base, supplier, impersonate=True))
