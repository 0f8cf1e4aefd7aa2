"""IamCredentialsClient: generateAccessToken / generateIdToken requests, expiry parsing and its caps,
and IAM errors in the AIP-193 envelope (upstream.md §2; UP-05, UP-06, UP-07)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import jwt
import pytest

from metaemu.credentials.impersonation import ID_TOKEN_LIFETIME_S, IamCredentialsClient, Impersonation
from metaemu.credentials.sts import StsClient
from metaemu.credentials.tokens import JWT_TOKEN_TYPE, FederatedToken, SubjectToken
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.errors import UpstreamError
from metaemu.metrics import Metrics
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock
from metaemu.testing.fake_google import RecordedRequest
from metaemu.testing.world import AUDIENCE, SERVICE_ACCOUNT, World
from metaemu.transport import HttpClient
from tests.credentials.support import (
    CLOUD_SCOPE,
    IAM_SCOPE,
    IAM_URL,
    STORAGE_SCOPE,
    STS_URL,
    TIMEOUT_S,
    CannedClient,
    json_reply,
    sample,
)

SA_PATH = f"/v1/projects/-/serviceAccounts/{SERVICE_ACCOUNT}"
ACCESS_URL = f"{IAM_URL}/projects/-/serviceAccounts/{SERVICE_ACCOUNT}:generateAccessToken"
ID_URL = f"{IAM_URL}/projects/-/serviceAccounts/{SERVICE_ACCOUNT}:generateIdToken"
TARGET_AUDIENCE = "https://my-service.example"
#: A bearer for canned answers, which never look at it.
ANY_BEARER = FederatedToken(value="ya29.canned-bearer", expiry=DEFAULT_START + dt.timedelta(hours=1))


def iam_client(http: HttpClient, *, clock: FakeClock, metrics: Metrics) -> IamCredentialsClient:
    return IamCredentialsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="iam"), base_url=IAM_URL,
                                clock=clock, timeout_s=TIMEOUT_S)


async def federated(world: World, clock: FakeClock, metrics: Metrics) -> FederatedToken:
    """A real federated token from the world's fake STS, with the iam scope (as when impersonating)."""
    sts = StsClient(caller=UpstreamCaller(http=world.google.client(), metrics=metrics, backend="sts"), url=STS_URL,
                    clock=clock, timeout_s=TIMEOUT_S)
    subject = SubjectToken(value=world.token_file.read_text(), token_type=JWT_TOKEN_TYPE)
    return await sts.exchange(subject, audience=AUDIENCE, scopes=[IAM_SCOPE])


def only_iam_request(world: World) -> RecordedRequest:
    (request,) = [r for r in world.google.requests if r.endpoint != "sts"]
    return request


def without_delegates(body: dict[str, Any]) -> dict[str, Any]:
    """The body minus ``delegates``, which must be absent, null or empty (no delegation chain)."""
    assert body.get("delegates") in (None, [])
    return {k: v for k, v in body.items() if k != "delegates"}


# -- UP-05: the requests -------------------------------------------------------------------------


@pytest.mark.parametrize("lifetime_s", [3600, 1800])
async def test_generate_access_token_sends_sts_bearer_json_and_the_2_1_body_up05(
        world: World, clock: FakeClock, metrics: Metrics, lifetime_s: int) -> None:
    bearer = await federated(world, clock, metrics)
    token = await iam_client(world.google.client(), clock=clock, metrics=metrics).generate_access_token(
        email=SERVICE_ACCOUNT, bearer=bearer, scopes=[STORAGE_SCOPE, CLOUD_SCOPE], lifetime_s=lifetime_s)
    request = only_iam_request(world)
    assert (request.endpoint, request.method, request.path) == ("generateAccessToken", "POST",
                                                                f"{SA_PATH}:generateAccessToken")
    assert request.headers["Authorization"] == f"Bearer {bearer.value}"
    assert request.headers["Content-Type"] == "application/json"
    assert without_delegates(request.json) == {"scope": [STORAGE_SCOPE, CLOUD_SCOPE], "lifetime": f"{lifetime_s}s"}
    info = world.google.token_info(token.value)
    assert info is not None
    assert (info.email, info.scopes) == (SERVICE_ACCOUNT, (STORAGE_SCOPE, CLOUD_SCOPE))
    assert token.expiry == DEFAULT_START + dt.timedelta(seconds=lifetime_s)


@pytest.mark.parametrize("include_email", [True, False])
async def test_generate_id_token_sends_sts_bearer_json_and_the_2_1_body_up05(
        world: World, clock: FakeClock, metrics: Metrics, include_email: bool) -> None:
    bearer = await federated(world, clock, metrics)
    token = await iam_client(world.google.client(), clock=clock, metrics=metrics).generate_id_token(
        email=SERVICE_ACCOUNT, bearer=bearer, audience=TARGET_AUDIENCE, include_email=include_email)
    request = only_iam_request(world)
    assert (request.endpoint, request.method, request.path) == ("generateIdToken", "POST",
                                                                f"{SA_PATH}:generateIdToken")
    assert request.headers["Authorization"] == f"Bearer {bearer.value}"
    assert request.headers["Content-Type"] == "application/json"
    assert without_delegates(request.json) == {"audience": TARGET_AUDIENCE, "includeEmail": include_email}
    claims = jwt.decode(token.value, options={"verify_signature": False})
    assert claims["aud"] == TARGET_AUDIENCE
    assert ("email" in claims) is include_email
    assert token.expiry == DEFAULT_START + dt.timedelta(seconds=ID_TOKEN_LIFETIME_S)


# -- UP-06: expireTime ---------------------------------------------------------------------------


@pytest.mark.parametrize(("expire_time", "expected"), [
    ("2026-11-22T05:30:00Z", dt.datetime(2026, 11, 22, 5, 30, tzinfo=dt.UTC)),
    ("2026-11-22T05:30:00.5Z", dt.datetime(2026, 11, 22, 5, 30, 0, 500000, tzinfo=dt.UTC)),
    ("2026-11-22T05:30:00.123456Z", dt.datetime(2026, 11, 22, 5, 30, 0, 123456, tzinfo=dt.UTC)),
    # google.protobuf.Timestamp may carry nanoseconds; microseconds are kept, the rest dropped.
    ("2026-11-22T05:30:00.123456789Z", dt.datetime(2026, 11, 22, 5, 30, 0, 123456, tzinfo=dt.UTC)),
    ("2026-11-22T06:30:00+01:00", dt.datetime(2026, 11, 22, 5, 30, tzinfo=dt.UTC)),
], ids=["whole-seconds", "tenths", "micros", "nanos", "offset"])
async def test_expire_time_with_and_without_fractional_seconds_is_parsed_up06(
        clock: FakeClock, metrics: Metrics, expire_time: str, expected: dt.datetime) -> None:
    http = CannedClient(json_reply({"accessToken": "ya29.sa", "expireTime": expire_time}))
    token = await iam_client(http, clock=clock, metrics=metrics).generate_access_token(
        email=SERVICE_ACCOUNT, bearer=ANY_BEARER, scopes=[CLOUD_SCOPE], lifetime_s=3600)
    assert token.value == "ya29.sa"
    assert token.expiry == expected  # the same instant (aware datetimes compare across offsets)


async def test_expire_time_with_an_offset_is_recorded_as_utc_up06(clock: FakeClock, metrics: Metrics) -> None:
    http = CannedClient(json_reply({"accessToken": "ya29.sa", "expireTime": "2026-11-22T06:30:00+01:00"}))
    token = await iam_client(http, clock=clock, metrics=metrics).generate_access_token(
        email=SERVICE_ACCOUNT, bearer=ANY_BEARER, scopes=[CLOUD_SCOPE], lifetime_s=3600)
    assert token.expiry.tzinfo is dt.UTC


async def test_served_expiry_never_exceeds_sent_at_plus_lifetime_when_upstream_is_later_up06(
        clock: FakeClock, metrics: Metrics) -> None:
    # Upstream's clock runs three hours ahead of ours (or it ignored the lifetime asked for).
    http = CannedClient(json_reply({"accessToken": "ya29.sa", "expireTime": "2026-11-22T09:00:00Z"}))
    token = await iam_client(http, clock=clock, metrics=metrics).generate_access_token(
        email=SERVICE_ACCOUNT, bearer=ANY_BEARER, scopes=[CLOUD_SCOPE], lifetime_s=1800)
    assert token.expiry == DEFAULT_START + dt.timedelta(seconds=1800)


async def test_lifetime_cap_is_measured_from_before_the_request_was_sent_up06(
        clock: FakeClock, metrics: Metrics) -> None:
    # 45 s of latency; upstream stamps the full hour from *its* receipt of the request.
    http = CannedClient(json_reply({"accessToken": "ya29.sa", "expireTime": "2026-11-22T06:00:45Z"}),
                        on_send=lambda: clock.advance(45))
    token = await iam_client(http, clock=clock, metrics=metrics).generate_access_token(
        email=SERVICE_ACCOUNT, bearer=ANY_BEARER, scopes=[CLOUD_SCOPE], lifetime_s=3600)
    assert token.expiry == DEFAULT_START + dt.timedelta(seconds=3600)


@pytest.mark.parametrize("body", [
    {"accessToken": "ya29.sa"},
    {"accessToken": "ya29.sa", "expireTime": "tomorrow"},
    {"accessToken": "ya29.sa", "expireTime": ""},
    {"accessToken": "ya29.sa", "expireTime": 1795324500},
    {"expireTime": "2026-11-22T05:30:00Z"},
    {"accessToken": "", "expireTime": "2026-11-22T05:30:00Z"},
], ids=["no-expire-time", "garbage-expire-time", "empty-expire-time", "numeric-expire-time", "no-token",
        "empty-token"])
async def test_generate_access_token_rejects_a_malformed_success_as_retryable_up06(
        clock: FakeClock, metrics: Metrics, body: dict[str, Any]) -> None:
    http = CannedClient(json_reply(body))
    with pytest.raises(UpstreamError) as caught:
        await iam_client(http, clock=clock, metrics=metrics).generate_access_token(
            email=SERVICE_ACCOUNT, bearer=ANY_BEARER, scopes=[CLOUD_SCOPE], lifetime_s=3600)
    err = caught.value
    assert (err.service, err.url, err.status) == ("iam", ACCESS_URL, 200)
    assert (err.retryable, err.permanent) == (True, False)


# -- ID token expiry -----------------------------------------------------------------------------


def unsigned_jwt(claims: dict[str, Any]) -> str:
    """A compact JWT; metaemu reads ``exp`` without verifying (the client verifies)."""
    return jwt.encode(claims, "k" * 64, algorithm="HS256")


async def id_token_expiry(clock: FakeClock, metrics: Metrics, token: str, *, latency_s: float = 0) -> dt.datetime:
    http = CannedClient(json_reply({"token": token}), on_send=lambda: clock.advance(latency_s))
    identity = await iam_client(http, clock=clock, metrics=metrics).generate_id_token(
        email=SERVICE_ACCOUNT, bearer=ANY_BEARER, audience=TARGET_AUDIENCE, include_email=False)
    assert identity.value == token
    return identity.expiry


async def test_id_token_expiry_is_taken_from_the_jwt_exp(clock: FakeClock, metrics: Metrics) -> None:
    exp = int(DEFAULT_START.timestamp()) + 1800
    assert await id_token_expiry(clock, metrics, unsigned_jwt({"exp": exp})) == DEFAULT_START + dt.timedelta(
        seconds=1800)


async def test_id_token_expiry_is_capped_at_sent_at_plus_one_hour(clock: FakeClock, metrics: Metrics) -> None:
    far = int(DEFAULT_START.timestamp()) + 6 * 3600  # an upstream clock hours ahead
    expiry = await id_token_expiry(clock, metrics, unsigned_jwt({"exp": far}), latency_s=20)
    assert expiry == DEFAULT_START + dt.timedelta(seconds=ID_TOKEN_LIFETIME_S)


@pytest.mark.parametrize("body", [
    {},
    {"token": ""},
    {"token": "not-a-jwt"},
    {"token": unsigned_jwt({"sub": "no-exp"})},
    {"token": unsigned_jwt({"exp": "soon"})},
], ids=["no-token", "empty-token", "not-a-jwt", "no-exp", "string-exp"])
async def test_generate_id_token_rejects_a_malformed_success_as_retryable(
        clock: FakeClock, metrics: Metrics, body: dict[str, Any]) -> None:
    http = CannedClient(json_reply(body))
    with pytest.raises(UpstreamError) as caught:
        await iam_client(http, clock=clock, metrics=metrics).generate_id_token(
            email=SERVICE_ACCOUNT, bearer=ANY_BEARER, audience=TARGET_AUDIENCE, include_email=True)
    err = caught.value
    assert (err.service, err.url, err.status, err.retryable) == ("iam", ID_URL, 200, True)
    if body.get("token"):
        assert body["token"] not in str(err)  # SEC-33


async def test_generate_id_token_rejects_an_out_of_range_exp_as_retryable(clock: FakeClock, metrics: Metrics) -> None:
    http = CannedClient(json_reply({"token": unsigned_jwt({"exp": 10**20})}))
    with pytest.raises(UpstreamError):
        await iam_client(http, clock=clock, metrics=metrics).generate_id_token(
            email=SERVICE_ACCOUNT, bearer=ANY_BEARER, audience=TARGET_AUDIENCE, include_email=True)


# -- UP-07: IAM errors keep the AIP-193 envelope -------------------------------------------------


async def test_iam_permission_denied_keeps_status_raw_body_code_and_reason_and_is_permanent_up07(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    world.google.revoke(SERVICE_ACCOUNT, world.principal)
    bearer = await federated(world, clock, metrics)
    with pytest.raises(UpstreamError) as caught:
        await iam_client(world.google.client(), clock=clock, metrics=metrics).generate_access_token(
            email=SERVICE_ACCOUNT, bearer=bearer, scopes=[CLOUD_SCOPE], lifetime_s=3600)
    err = caught.value
    assert (err.service, err.url, err.status) == ("iam", ACCESS_URL, 403)
    assert err.error_code == "PERMISSION_DENIED"
    envelope = err.body["error"]
    assert (envelope["code"], envelope["status"]) == (403, "PERMISSION_DENIED")
    assert envelope["details"][0]["reason"] == "IAM_PERMISSION_DENIED"
    assert envelope["details"][0]["metadata"] == {"permission": "iam.serviceAccounts.getAccessToken"}
    assert err.permanent is True
    assert err.retryable is False
    assert "Permission 'iam.serviceAccounts.getAccessToken' denied" in err.reason
    assert bearer.value not in str(err)  # SEC-33
    assert sample(metrics, "metaemu_upstream_errors_total", backend="iam", status="403") == 1


async def test_iam_permission_denied_on_generate_id_token_is_permanent_up07(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    world.google.revoke(SERVICE_ACCOUNT, world.principal)
    bearer = await federated(world, clock, metrics)
    with pytest.raises(UpstreamError) as caught:
        await iam_client(world.google.client(), clock=clock, metrics=metrics).generate_id_token(
            email=SERVICE_ACCOUNT, bearer=bearer, audience=TARGET_AUDIENCE, include_email=True)
    err = caught.value
    assert (err.url, err.status, err.error_code, err.permanent) == (ID_URL, 403, "PERMISSION_DENIED", True)
    assert err.body["error"]["details"][0]["metadata"] == {"permission": "iam.serviceAccounts.getOpenIdToken"}


async def test_iam_invalid_argument_for_a_too_long_lifetime_is_kept_and_permanent_up07(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    bearer = await federated(world, clock, metrics)
    with pytest.raises(UpstreamError) as caught:
        await iam_client(world.google.client(), clock=clock, metrics=metrics).generate_access_token(
            email=SERVICE_ACCOUNT, bearer=bearer, scopes=[CLOUD_SCOPE], lifetime_s=7200)
    err = caught.value
    assert (err.status, err.error_code, err.permanent) == (400, "INVALID_ARGUMENT", True)
    assert err.body["error"]["details"][0]["fieldViolations"][0]["field"] == "lifetime"
    assert sample(metrics, "metaemu_upstream_errors_total", backend="iam", status="400") == 1


async def test_iam_unauthenticated_bearer_is_retryable_because_a_fresh_exchange_fixes_it(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    unknown = FederatedToken(value="ya29.never-issued", expiry=DEFAULT_START + dt.timedelta(hours=1))
    with pytest.raises(UpstreamError) as caught:
        await iam_client(world.google.client(), clock=clock, metrics=metrics).generate_access_token(
            email=SERVICE_ACCOUNT, bearer=unknown, scopes=[CLOUD_SCOPE], lifetime_s=3600)
    err = caught.value
    assert (err.status, err.error_code, err.retryable, err.permanent) == (401, "UNAUTHENTICATED", True, False)


@pytest.mark.parametrize(("status", "code"), [(500, "INTERNAL"), (503, "UNAVAILABLE"), (429, "RESOURCE_EXHAUSTED")])
async def test_iam_server_errors_and_throttling_are_retryable_and_counted_up07(
        world: World, clock: FakeClock, metrics: Metrics, status: int, code: str) -> None:
    bearer = await federated(world, clock, metrics)
    world.google.fail("iam", status=status)
    with pytest.raises(UpstreamError) as caught:
        await iam_client(world.google.client(), clock=clock, metrics=metrics).generate_access_token(
            email=SERVICE_ACCOUNT, bearer=bearer, scopes=[CLOUD_SCOPE], lifetime_s=3600)
    err = caught.value
    assert (err.status, err.error_code, err.retryable, err.permanent) == (status, code, True, False)
    assert sample(metrics, "metaemu_upstream_errors_total", backend="iam", status=str(status)) == 1


# -- delegation chains (issue #14: impersonated_service_account files) ---------------------------

DELEGATE = f"hop@{SERVICE_ACCOUNT.split('@')[1]}"


def test_delegates_become_the_resource_names_iam_requires_whichever_form_the_file_used() -> None:
    chain = Impersonation(service_account=SERVICE_ACCOUNT, delegates=("a@p.iam.gserviceaccount.com",
                                                                      "projects/-/serviceAccounts/b@p.test", "1234"))
    assert chain.delegate_names == ["projects/-/serviceAccounts/a@p.iam.gserviceaccount.com",
                                    "projects/-/serviceAccounts/b@p.test", "projects/-/serviceAccounts/1234"]


@pytest.mark.parametrize("method", ["generateAccessToken", "generateIdToken"])
async def test_both_iam_methods_send_the_delegation_chain_and_succeed_when_every_hop_is_granted(
        world: World, clock: FakeClock, metrics: Metrics, method: str) -> None:
    world.google.add_service_account(DELEGATE)
    world.google.grant(DELEGATE, world.principal)  # caller -> hop
    world.google.revoke(SERVICE_ACCOUNT, world.principal)
    world.google.grant(SERVICE_ACCOUNT, f"serviceAccount:{DELEGATE}")  # hop -> target
    bearer = await federated(world, clock, metrics)
    client = iam_client(world.google.client(), clock=clock, metrics=metrics)
    names = Impersonation(service_account=SERVICE_ACCOUNT, delegates=(DELEGATE,)).delegate_names
    if method == "generateAccessToken":
        await client.generate_access_token(email=SERVICE_ACCOUNT, bearer=bearer, scopes=[CLOUD_SCOPE],
                                           lifetime_s=3600, delegates=names)
    else:
        await client.generate_id_token(email=SERVICE_ACCOUNT, bearer=bearer, audience=TARGET_AUDIENCE,
                                       include_email=True, delegates=names)
    request = only_iam_request(world)
    assert request.endpoint == method
    assert request.json["delegates"] == [f"projects/-/serviceAccounts/{DELEGATE}"]


@pytest.mark.parametrize("missing", ["caller->hop", "hop->target"])
async def test_a_missing_token_creator_binding_on_any_hop_is_iams_exact_permanent_403(
        world: World, clock: FakeClock, metrics: Metrics, missing: str) -> None:
    world.google.add_service_account(DELEGATE)
    world.google.revoke(SERVICE_ACCOUNT, world.principal)
    if missing != "caller->hop":
        world.google.grant(DELEGATE, world.principal)
    if missing != "hop->target":
        world.google.grant(SERVICE_ACCOUNT, f"serviceAccount:{DELEGATE}")
    bearer = await federated(world, clock, metrics)
    with pytest.raises(UpstreamError) as caught:
        await iam_client(world.google.client(), clock=clock, metrics=metrics).generate_access_token(
            email=SERVICE_ACCOUNT, bearer=bearer, scopes=[CLOUD_SCOPE], lifetime_s=3600,
            delegates=[f"projects/-/serviceAccounts/{DELEGATE}"])
    err = caught.value
    assert (err.status, err.error_code, err.permanent) == (403, "PERMISSION_DENIED", True)
    assert err.body["error"]["message"] == ("Permission 'iam.serviceAccounts.getAccessToken' denied on resource "
                                            "(or it may not exist).")
