"""UpstreamCaller and the transport seam under it: every failure becomes an UpstreamError that keeps
what upstream said, with metrics; the aiohttp adapter on loopback; and no token in any repr
(STYLE "Errors keep what upstream said"; UP-04, UP-07, SEC-33)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Any

import pytest
from aiohttp import web

from metaemu.credentials.tokens import JWT_TOKEN_TYPE, AccessToken, FederatedToken, IdentityToken, SubjectToken
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.errors import BODY_EXCERPT_CHARS, CredentialError, UpstreamError
from metaemu.metrics import Metrics
from metaemu.testing.fake_clock import DEFAULT_START, settle
from metaemu.testing.faults import garbage_response
from metaemu.testing.world import World
from metaemu.transport import AiohttpClient, HttpRequest, HttpResponse, TransportFailure
from tests.credentials.support import STS_URL, CannedClient, json_reply, sample, serve

SECRET = "ya29.SECRET-token-value-that-must-never-be-printed"
REQUEST = HttpRequest.form(STS_URL, {"subject_token": SECRET})


async def call_error(caller: UpstreamCaller, request: HttpRequest = REQUEST) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await caller.call_json(request)
    return caught.value


# -- UpstreamCaller ------------------------------------------------------------------------------


async def test_a_2xx_json_object_is_returned_and_its_latency_observed(metrics: Metrics) -> None:
    caller = UpstreamCaller(http=CannedClient(json_reply({"ok": True})), metrics=metrics, backend="sts")
    assert await caller.call_json(REQUEST) == {"ok": True}
    assert sample(metrics, "metaemu_upstream_request_duration_seconds_count", backend="sts") == 1
    assert sample(metrics, "metaemu_upstream_errors_total", backend="sts", status="200") == 0


@pytest.mark.parametrize("reply", [
    garbage_response(),
    json_reply(["not", "an", "object"]),
    HttpResponse(status=200, body=b""),
], ids=["html", "json-array", "empty"])
async def test_a_2xx_that_is_not_a_json_object_is_a_retryable_error_and_counted(
        metrics: Metrics, reply: HttpResponse) -> None:
    err = await call_error(UpstreamCaller(http=CannedClient(reply), metrics=metrics, backend="iam"))
    assert (err.service, err.url, err.status) == ("iam", STS_URL, 200)
    assert (err.retryable, err.permanent) == (True, False)
    assert sample(metrics, "metaemu_upstream_errors_total", backend="iam", status="200") == 1


@pytest.mark.parametrize(("status", "retryable"), [
    (400, False), (403, False), (404, False),  # denials and bad requests: retrying will not help
    (401, True),  # the short-lived bearer expired between mint and use: a fresh exchange fixes it
    (408, True), (429, True), (500, True), (502, True), (503, True), (504, True),
])
async def test_http_status_decides_retryable_versus_permanent_and_is_counted_up04_up07(
        metrics: Metrics, status: int, retryable: bool) -> None:
    body = {"error": {"code": status, "message": "m", "status": "S"}}
    caller = UpstreamCaller(http=CannedClient(json_reply(body, status=status)), metrics=metrics, backend="iam")
    err = await call_error(caller)
    assert err.status == status
    assert err.body == body
    assert err.retryable is retryable
    assert err.permanent is (not retryable)
    assert isinstance(err, CredentialError)
    assert sample(metrics, "metaemu_upstream_errors_total", backend="iam", status=str(status)) == 1
    assert sample(metrics, "metaemu_upstream_request_duration_seconds_count", backend="iam") == 1


async def test_a_transport_failure_is_status_zero_retryable_chained_and_counted_up04(metrics: Metrics) -> None:
    failure = TransportFailure(STS_URL, "no response within 10s")
    err = await call_error(UpstreamCaller(http=CannedClient(failure), metrics=metrics, backend="sts"))
    assert (err.status, err.body, err.retryable, err.permanent) == (0, "no response within 10s", True, False)
    assert err.__cause__ is failure
    assert err.reason == "sts unreachable: no response within 10s"
    assert sample(metrics, "metaemu_upstream_errors_total", backend="sts", status="0") == 1
    assert sample(metrics, "metaemu_upstream_request_duration_seconds_count", backend="sts") == 1


async def test_a_non_json_error_body_is_kept_as_text(metrics: Metrics) -> None:
    reply = HttpResponse(status=502, body=b"<html>Bad Gateway</html>")
    err = await call_error(UpstreamCaller(http=CannedClient(reply), metrics=metrics, backend="sts"))
    assert (err.body, err.error_code) == ("<html>Bad Gateway</html>", None)
    assert err.reason == "sts returned 502: <html>Bad Gateway</html>"


async def test_a_huge_error_body_is_kept_whole_but_truncated_in_the_message(metrics: Metrics) -> None:
    description = "x" * (BODY_EXCERPT_CHARS * 3)
    body = {"error": "invalid_grant", "error_description": description}
    err = await call_error(UpstreamCaller(http=CannedClient(json_reply(body, status=400)), metrics=metrics,
                                          backend="sts"))
    assert err.body == body  # nothing lost for whoever inspects the error
    assert len(err.reason) < BODY_EXCERPT_CHARS + 100
    assert err.reason.endswith("…(truncated)")


# -- AiohttpClient on loopback -------------------------------------------------------------------


async def test_aiohttp_client_round_trips_a_form_post_to_the_fake(world: World) -> None:
    client = AiohttpClient()
    async with serve(world.google.app()) as base:
        try:
            response = await client.send(HttpRequest.form(f"{base}/v1/token", {"grant_type": "nope"}))
        finally:
            await client.close()
    assert response.status == 400
    assert response.decoded()["error"] == "unsupported_grant_type"
    (recorded,) = world.google.requests
    assert recorded.form == {"grant_type": "nope"}


async def test_aiohttp_client_turns_connection_refused_into_transport_failure(refused_port: int) -> None:
    url = f"http://127.0.0.1:{refused_port}/v1/token"
    client = AiohttpClient()
    try:
        with pytest.raises(TransportFailure) as caught:
            await client.send(HttpRequest.form(url, {"subject_token": SECRET}))
    finally:
        await client.close()
    assert caught.value.url == url
    assert SECRET not in str(caught.value)


async def test_aiohttp_client_does_not_follow_redirects() -> None:
    # SECURITY: a redirect must not carry a bearer or subject token to another host.
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/elsewhere":
            return web.json_response({"followed": True})
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    client = AiohttpClient()
    async with serve(app) as base:
        try:
            response = await client.send(HttpRequest.form(f"{base}/v1/token", {"subject_token": SECRET}))
        finally:
            await client.close()
    assert response.status == 302
    assert hits == ["/v1/token"]


async def test_aiohttp_client_ignores_proxy_environment(world: World, monkeypatch: pytest.MonkeyPatch,
                                                        refused_port: int) -> None:
    dead_proxy = f"http://127.0.0.1:{refused_port}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = AiohttpClient()
    async with serve(world.google.app()) as base:
        try:
            response = await client.send(HttpRequest.form(f"{base}/v1/token", {}))
        finally:
            await client.close()
    assert response.status == 400  # answered by the fake, not refused by the dead proxy


async def test_aiohttp_client_reads_a_body_that_arrives_in_two_parts() -> None:
    body = json.dumps({"access_token": "ya29." + "t" * 1500, "expires_in": 3599}).encode()

    async def split(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(body[:100])
        await settle()  # let the client see the first part before the rest is sent
        with contextlib.suppress(ConnectionError):  # the buggy client has already hung up
            await response.write(body[100:])
            await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/token", split)
    client = AiohttpClient()
    async with serve(app) as base:
        try:
            response = await client.send(HttpRequest.form(f"{base}/v1/token", {}))
        finally:
            await client.close()
    assert response.body == body


# -- SEC-33: no token in any repr ----------------------------------------------------------------


def _reprs(value: Any) -> str:
    return f"{value!r} {value!s} {[value]!r}"


def test_http_request_and_response_reprs_never_contain_bodies_or_headers_sec33() -> None:
    requests = [
        HttpRequest.form(STS_URL, {"subject_token": SECRET}),
        HttpRequest.json("https://iam.test/x:generateAccessToken", {"scope": ["s"]},
                         headers={"Authorization": f"Bearer {SECRET}"}),
    ]
    responses = [json_reply({"access_token": SECRET}), json_reply({"token": SECRET}, status=401)]
    for value in [*requests, *responses]:
        assert SECRET not in _reprs(value)
    assert _reprs(requests[0]).startswith(f"HttpRequest(method='POST', url='{STS_URL}')")
    assert repr(responses[0]) == "HttpResponse(status=200)"


@pytest.mark.parametrize("token", [
    SubjectToken(value=SECRET, token_type=JWT_TOKEN_TYPE, expiry=DEFAULT_START),
    FederatedToken(value=SECRET, expiry=DEFAULT_START),
    AccessToken(value=SECRET, expiry=DEFAULT_START),
    IdentityToken(value=SECRET, expiry=DEFAULT_START),
], ids=["subject", "federated", "access", "identity"])
def test_token_reprs_never_contain_the_value_but_show_the_expiry_sec33(token: object) -> None:
    text = _reprs(token)
    assert SECRET not in text
    assert repr(DEFAULT_START) in text


async def test_upstream_error_for_a_request_carrying_a_bearer_never_prints_it_sec33(metrics: Metrics) -> None:
    request = HttpRequest.json("https://iam.test/x:generateAccessToken", {"scope": ["s"]},
                               headers={"Authorization": f"Bearer {SECRET}"})
    body = {"error": {"code": 401, "message": "Request had invalid authentication credentials.",
                      "status": "UNAUTHENTICATED"}}
    err = await call_error(UpstreamCaller(http=CannedClient(json_reply(body, status=401)), metrics=metrics,
                                          backend="iam"), request)
    assert SECRET not in f"{err!r} {err!s} {err.body!r} {err.url}"
    assert err.retryable


def test_token_expiry_helpers_round_down_and_never_go_negative() -> None:
    token = AccessToken(value=SECRET, expiry=DEFAULT_START + dt.timedelta(seconds=90, milliseconds=999))
    assert token.expires_in(DEFAULT_START) == 90
    assert token.expires_in(DEFAULT_START + dt.timedelta(hours=2)) == 0
    assert token.remaining_s(DEFAULT_START) == pytest.approx(90.999)
