"""FakeWorkforceSts verifies what STS ``oauthtoken`` verifies (issue #14): the form body, the grant,
the OAuth client in HTTP Basic, the refresh token or single-use authorization code and their
client; and what it issues is a workforce principal's token that IAM recognises."""

from __future__ import annotations

import base64
import json

import pytest

from metaemu.errors import ConfigError
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_workforce import FakeWorkforceSts, workforce_principal
from metaemu.transport import HttpRequest, HttpResponse

URL = "https://sts.googleapis.com/v1/oauthtoken"
AUDIENCE = "//iam.googleapis.com/locations/global/workforcePools/pool/providers/prov"
CLIENT_ID, SECRET = "32555940559.apps.googleusercontent.com", "client-secret"


@pytest.fixture
def google() -> FakeGoogle:
    return FakeGoogle()


@pytest.fixture
def sts(google: FakeGoogle) -> FakeWorkforceSts:
    sts = FakeWorkforceSts(google=google)
    sts.add_client(CLIENT_ID, secret=SECRET)
    return sts


def basic(client_id: str = CLIENT_ID, secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def post(sts: FakeWorkforceSts, fields: dict[str, str], headers: dict[str, str]) -> HttpResponse:
    return await sts.handle(HttpRequest.form(URL, fields, headers=headers))


def error(response: HttpResponse) -> tuple[int, str]:
    return response.status, json.loads(response.body)["error"]


async def test_a_refresh_issues_a_token_iam_sees_as_the_workforce_principal(
        sts: FakeWorkforceSts, google: FakeGoogle) -> None:
    refresh = sts.login("alice", audience=AUDIENCE, client=sts.add_client(CLIENT_ID, secret=SECRET))
    response = await post(sts, {"grant_type": "refresh_token", "refresh_token": refresh}, basic())
    body = json.loads(response.body)
    assert response.status == 200 and set(body) == {"access_token", "expires_in", "token_type"}
    info = google.token_info(body["access_token"])
    assert info is not None
    assert info.principal == "principal://iam.googleapis.com/locations/global/workforcePools/pool/subject/alice"


@pytest.mark.parametrize(("fields", "headers", "expected"), [
    ({"grant_type": "refresh_token", "refresh_token": "wf-rt-unknown"}, basic(), (400, "invalid_grant")),
    ({"grant_type": "refresh_token"}, basic(), (400, "invalid_request")),
    ({"grant_type": "password"}, basic(), (400, "unsupported_grant_type")),
    ({"grant_type": "refresh_token", "refresh_token": "x"}, basic(secret="wrong"), (401, "invalid_client")),
    ({"grant_type": "refresh_token", "refresh_token": "x"}, {}, (401, "invalid_client")),
    ({"grant_type": "refresh_token", "refresh_token": "x"}, basic(client_id="other"), (401, "invalid_client")),
], ids=["unknown-token", "no-token", "grant", "secret", "no-client", "unknown-client"])
async def test_refusals_are_rfc6749_errors(sts: FakeWorkforceSts, fields: dict[str, str],
                                           headers: dict[str, str], expected: tuple[int, str]) -> None:
    assert error(await post(sts, fields, headers)) == expected


async def test_a_revoked_or_other_clients_refresh_token_is_invalid_grant(sts: FakeWorkforceSts) -> None:
    other = sts.add_client("other-client", secret="s2")
    refresh = sts.login("alice", audience=AUDIENCE, client=other)
    assert error(await post(sts, {"grant_type": "refresh_token", "refresh_token": refresh}, basic())) == (
        400, "invalid_grant")
    sts.revoke(refresh)
    assert error(await post(sts, {"grant_type": "refresh_token", "refresh_token": refresh},
                            basic("other-client", "s2"))) == (400, "invalid_grant")


async def test_a_json_body_is_refused(sts: FakeWorkforceSts) -> None:
    response = await sts.handle(HttpRequest.json(URL, {"grant_type": "refresh_token"}, headers=basic()))
    assert error(response) == (400, "invalid_request")


async def test_an_authorization_code_is_redeemed_once_for_a_refresh_token(sts: FakeWorkforceSts) -> None:
    code = sts.authorization_code("alice", audience=AUDIENCE, client=sts.add_client(CLIENT_ID, secret=SECRET))
    fields = {"grant_type": "authorization_code", "code": code, "redirect_uri": "https://sdk.cloud.google/x",
              "code_verifier": "v" * 43}
    first = await post(sts, fields, basic())
    assert first.status == 200 and json.loads(first.body)["refresh_token"].startswith("wf-rt-")
    assert error(await post(sts, fields, basic())) == (400, "invalid_grant")
    fields.pop("code_verifier")
    assert error(await post(sts, fields, basic())) == (400, "invalid_request")


def test_only_workforce_providers_name_principals() -> None:
    with pytest.raises(ConfigError):
        workforce_principal("//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q",
                            "alice")
