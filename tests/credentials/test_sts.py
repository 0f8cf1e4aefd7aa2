"""StsClient: the RFC 8693 form metaemu sends (checked against google-auth as an oracle), parsing of
the success shape, and how STS failures surface (upstream.md §1, §9; UP-01, UP-03, UP-04)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests
from google.auth import identity_pool
from google.auth.transport.requests import Request as GoogleAuthRequest

from metaemu.credentials.sources.file import FileSource
from metaemu.credentials.sts import GRANT_TYPE, StsClient
from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, SubjectToken
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.errors import UpstreamError
from metaemu.metrics import Metrics
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock
from metaemu.testing.world import AUDIENCE, SERVICE_ACCOUNT, World
from metaemu.transport import AiohttpClient, HttpClient, HttpResponse, TransportFailure
from tests.credentials.support import (
    CLOUD_SCOPE,
    IAM_SCOPE,
    STORAGE_SCOPE,
    STS_URL,
    TIMEOUT_S,
    CannedClient,
    build_pipeline,
    json_reply,
    sample,
    serve,
)

#: google-auth 2.62.2's field order (upstream.md §1.4); empty optional fields are dropped.
GOOGLE_AUTH_FIELD_ORDER = ["grant_type", "audience", "scope", "requested_token_type", "subject_token",
                           "subject_token_type"]
SUBJECT = SubjectToken(value="subject.jwt.value", token_type=JWT_TOKEN_TYPE)
_MISSING = object()


def sts_client(http: HttpClient, *, clock: FakeClock, metrics: Metrics) -> StsClient:
    return StsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="sts"), url=STS_URL, clock=clock,
                     timeout_s=TIMEOUT_S)


def sts_success(**fields: Any) -> dict[str, Any]:
    """The §1.2 success shape; a field set to ``_MISSING`` is left out."""
    body = {"access_token": "ya29.federated", "issued_token_type": ACCESS_TOKEN_TYPE, "token_type": "Bearer",
            "expires_in": 3599, **fields}
    return {k: v for k, v in body.items() if v is not _MISSING}


# -- UP-01: the request --------------------------------------------------------------------------


async def test_sts_request_is_form_encoded_without_authorization_with_six_fields_in_google_auth_order_up01(
        world: World, clock: FakeClock, metrics: Metrics, source: FileSource) -> None:
    pipeline = build_pipeline(http=world.google.client(), clock=clock, metrics=metrics, source=source,
                              service_account=None, scopes=(CLOUD_SCOPE, STORAGE_SCOPE))
    await pipeline.federated_token()
    (sts,) = world.google.requests
    assert (sts.endpoint, sts.method, sts.path) == ("sts", "POST", "/v1/token")
    assert sts.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "Authorization" not in sts.headers
    # Exactly the six fields, once each, in google-auth's order; no "options" when none is configured.
    assert [k for k, _ in parse_qsl(sts.body.decode(), keep_blank_values=True)] == GOOGLE_AUTH_FIELD_ORDER
    assert dict(sts.form) == {
        "grant_type": GRANT_TYPE,
        "audience": AUDIENCE,
        "scope": f"{CLOUD_SCOPE} {STORAGE_SCOPE}",
        "requested_token_type": ACCESS_TOKEN_TYPE,
        "subject_token": world.token_file.read_text(),
        "subject_token_type": JWT_TOKEN_TYPE,
    }


class _Supplier:
    """``google.auth.identity_pool.SubjectTokenSupplier``, duck-typed: always the same token."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_subject_token(self, context: Any, request: Any) -> str:
        return self.token


class _RefuseAdapter(requests.adapters.BaseAdapter):
    """SECURITY: google-auth must never reach real Google from a test; only loopback http is mounted."""

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        raise requests.ConnectionError(f"non-loopback request refused: {request.url}")

    def close(self) -> None:
        pass


def _google_auth_refresh(credentials: Any) -> None:
    session = requests.Session()
    session.trust_env = False  # no proxies from the environment
    session.mount("https://", _RefuseAdapter())
    credentials.refresh(GoogleAuthRequest(session))


@pytest.mark.parametrize("impersonate", [False, True], ids=["federated", "impersonated"])
async def test_sts_form_equals_google_auth_identity_pool_form_field_for_field_up01(
        world: World, clock: FakeClock, metrics: Metrics, source: FileSource, impersonate: bool) -> None:
    google = world.google
    subject_token = world.token_file.read_text()
    http = AiohttpClient()
    async with serve(google.app()) as base:
        try:
            # metaemu's real aiohttp client on the same socket: both requests travel the same path.
            pipeline = build_pipeline(http=http, clock=clock, metrics=metrics, source=source,
                                      service_account=SERVICE_ACCOUNT if impersonate else None,
                                      sts_url=f"{base}/v1/token")
            await pipeline.federated_token()
        finally:
            await http.close()
        extra = ({"service_account_impersonation_url":
                  f"{base}/v1/projects/-/serviceAccounts/{SERVICE_ACCOUNT}:generateAccessToken"}
                 if impersonate else {})
        # google-auth ships py.typed but leaves this constructor unannotated.
        credentials = identity_pool.Credentials(  # type: ignore[no-untyped-call]
            audience=AUDIENCE, subject_token_type=JWT_TOKEN_TYPE, token_url=f"{base}/v1/token",
            subject_token_supplier=_Supplier(subject_token), scopes=[CLOUD_SCOPE], **extra)
        await asyncio.to_thread(_google_auth_refresh, credentials)

    ours, theirs = (r for r in google.requests if r.endpoint == "sts")
    assert dict(ours.form) == dict(theirs.form)  # every field and value, order aside
    assert list(ours.form) == list(theirs.form) == GOOGLE_AUTH_FIELD_ORDER  # ...and the order too
    assert ours.form["scope"] == (IAM_SCOPE if impersonate else CLOUD_SCOPE)
    for request in (ours, theirs):
        assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert "Authorization" not in request.headers


# -- UP-03: the success shape --------------------------------------------------------------------


@pytest.mark.parametrize(("expires_in", "lifetime_s"), [
    (3599, 3599),
    ("3599", 3599),  # google-auth accepts a string too (upstream.md §1.4)
    (_MISSING, 3600),  # absent when the subject token is a Google access token (§1.2): one hour
], ids=["integer", "numeric-string", "missing"])
async def test_sts_accepts_integer_string_and_missing_expires_in_up03(
        clock: FakeClock, metrics: Metrics, expires_in: object, lifetime_s: int) -> None:
    http = CannedClient(json_reply(sts_success(expires_in=expires_in)))
    token = await sts_client(http, clock=clock, metrics=metrics).exchange(SUBJECT, audience=AUDIENCE,
                                                                          scopes=[CLOUD_SCOPE])
    assert token.value == "ya29.federated"
    assert token.expiry == DEFAULT_START + dt.timedelta(seconds=lifetime_s)


async def test_sts_expiry_counts_from_before_the_request_was_sent_up03(clock: FakeClock, metrics: Metrics) -> None:
    # 30 s pass on the wire: the expiry errs early by those 30 s rather than late.
    http = CannedClient(json_reply(sts_success(expires_in=3599)), on_send=lambda: clock.advance(30))
    token = await sts_client(http, clock=clock, metrics=metrics).exchange(SUBJECT, audience=AUDIENCE,
                                                                          scopes=[CLOUD_SCOPE])
    assert token.expiry == DEFAULT_START + dt.timedelta(seconds=3599)


@pytest.mark.parametrize("body", [
    sts_success(expires_in=0),
    sts_success(expires_in=-60),
    sts_success(expires_in="-60"),
    sts_success(expires_in="soon"),
    sts_success(expires_in="3599.5"),
    sts_success(expires_in=None),
    sts_success(expires_in=[3599]),
    sts_success(access_token=_MISSING),
    sts_success(access_token=""),
    sts_success(access_token=12345),
], ids=["zero", "negative", "negative-string", "garbage", "decimal-string", "null", "list", "no-token",
        "empty-token", "numeric-token"])
async def test_sts_rejects_a_malformed_success_as_retryable_upstream_error_up03(
        clock: FakeClock, metrics: Metrics, body: dict[str, Any]) -> None:
    http = CannedClient(json_reply(body))
    with pytest.raises(UpstreamError) as caught:
        await sts_client(http, clock=clock, metrics=metrics).exchange(SUBJECT, audience=AUDIENCE,
                                                                      scopes=[CLOUD_SCOPE])
    err = caught.value
    assert (err.service, err.url, err.status) == ("sts", STS_URL, 200)
    assert err.retryable
    assert not err.permanent


@pytest.mark.parametrize("raw_expires_in", [b"Infinity", b"1000000000000"], ids=["infinity", "huge"])
async def test_sts_rejects_an_out_of_range_expires_in_as_retryable_upstream_error_up03(
        clock: FakeClock, metrics: Metrics, raw_expires_in: bytes) -> None:
    body = b'{"access_token": "ya29.federated", "token_type": "Bearer", "expires_in": ' + raw_expires_in + b"}"
    http = CannedClient(HttpResponse(status=200, headers={"Content-Type": "application/json"}, body=body))
    with pytest.raises(UpstreamError) as caught:
        await sts_client(http, clock=clock, metrics=metrics).exchange(SUBJECT, audience=AUDIENCE,
                                                                      scopes=[CLOUD_SCOPE])
    assert caught.value.retryable


# -- UP-04: STS errors keep status and raw JSON --------------------------------------------------


async def exchange_error(client: StsClient, token: str, *, audience: str = AUDIENCE) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await client.exchange(SubjectToken(value=token, token_type=JWT_TOKEN_TYPE), audience=audience,
                              scopes=[IAM_SCOPE])
    return caught.value


async def test_sts_invalid_grant_keeps_status_raw_body_and_code_and_is_permanent_up04(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    wrong_audience = world.issuer.mint_kubernetes(namespace="default", service_account="demo-app",
                                                  audience="https://not-the-provider.example")
    err = await exchange_error(sts_client(world.google.client(), clock=clock, metrics=metrics), wrong_audience)
    assert (err.service, err.url, err.status) == ("sts", STS_URL, 400)
    assert err.error_code == "invalid_grant"
    assert set(err.body) == {"error", "error_description"}  # the RFC 6749 body, decoded but untouched
    assert err.body["error"] == "invalid_grant"
    assert err.body["error_description"].startswith("The audience in ID Token [https://not-the-provider.example]")
    assert err.permanent is True
    assert err.retryable is False
    assert "invalid_grant" in err.reason
    assert wrong_audience not in str(err)  # SEC-33: the subject token never reaches a message
    assert sample(metrics, "metaemu_upstream_errors_total", backend="sts", status="400") == 1


async def test_sts_invalid_target_for_an_unknown_provider_is_kept_up04(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    unknown = AUDIENCE.replace("demo-provider", "no-such-provider")
    err = await exchange_error(sts_client(world.google.client(), clock=clock, metrics=metrics),
                               world.token_file.read_text(), audience=unknown)
    assert (err.status, err.error_code, err.permanent) == (400, "invalid_target", True)
    assert "pool or provider is disabled or deleted" in err.body["error_description"]


async def test_sts_aws_format_error_without_error_code_keeps_its_description_up04(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    body = {"error_description": "AWS request has invalid format."}  # the shape users report (§1.3)
    world.google.fail("sts", status=400, body=body)
    err = await exchange_error(sts_client(world.google.client(), clock=clock, metrics=metrics),
                               world.token_file.read_text())
    assert (err.status, err.body, err.error_code, err.permanent) == (400, body, None, True)
    assert "AWS request has invalid format." in err.reason


@pytest.mark.parametrize(("status", "code"), [
    (500, "INTERNAL"), (503, "UNAVAILABLE"), (429, "RESOURCE_EXHAUSTED"),
])
async def test_sts_server_errors_and_throttling_are_retryable_and_counted_up04(
        world: World, clock: FakeClock, metrics: Metrics, status: int, code: str) -> None:
    world.google.fail("sts", status=status)  # the front end's AIP-193 envelope
    err = await exchange_error(sts_client(world.google.client(), clock=clock, metrics=metrics),
                               world.token_file.read_text())
    assert (err.status, err.error_code) == (status, code)
    assert err.body["error"]["code"] == status
    assert err.retryable is True
    assert err.permanent is False
    assert sample(metrics, "metaemu_upstream_errors_total", backend="sts", status=str(status)) == 1


async def test_sts_transport_failure_is_status_zero_retryable_and_counted_up04(
        clock: FakeClock, metrics: Metrics) -> None:
    failure = TransportFailure(STS_URL, "ClientConnectorError: connection refused")
    client = sts_client(CannedClient(failure), clock=clock, metrics=metrics)
    err = await exchange_error(client, "subject")
    assert (err.service, err.url, err.status) == ("sts", STS_URL, 0)
    assert err.retryable is True
    assert err.permanent is False
    assert err.error_code is None
    assert err.__cause__ is failure
    assert "sts unreachable" in err.reason
    assert sample(metrics, "metaemu_upstream_errors_total", backend="sts", status="0") == 1


async def test_sts_stalled_past_its_deadline_is_status_zero_retryable_up04(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    world.google.stall("sts")
    client = sts_client(world.google.client(clock=clock), clock=clock, metrics=metrics)
    pending = asyncio.create_task(exchange_error(client, world.token_file.read_text()))
    await clock.wait_for_sleepers(1)
    clock.advance(TIMEOUT_S)  # virtual time: the deadline passes without a real wait
    err = await pending
    world.google.clear_faults()
    assert (err.status, err.retryable, err.permanent) == (0, True, False)
    assert world.google.calls["sts"] == 1
