"""The ``google`` source: a developer's application default credentials, refreshed by google-auth
against a local OAuth token-endpoint stand-in, used directly as the bearer (issue #3, "google").

google-auth keeps expiry on the real clock, so these tests run on ``SystemClock`` (the module's
``world`` fixture overrides the virtual-time one of ``tests/credentials/conftest.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from metaemu.clock import SystemClock
from metaemu.config import parse_config
from metaemu.credentials.sources import SourceContext, build_source
from metaemu.credentials.sources.config import parse_source
from metaemu.credentials.sources.google import (
    CLOUD_PLATFORM_SCOPE,
    GoogleSource,
    GoogleSourceConfig,
    adc_path,
    build,
)
from metaemu.credentials.sources.google import (
    parse_config as parse_google_config,
)
from metaemu.errors import ConfigError, SourceError, UpstreamError
from metaemu.metrics import Metrics, create_metrics
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_google_tokens import new_rsa_key
from metaemu.testing.fake_oauth_user import FakeOAuthUser, OAuthClient
from metaemu.testing.world import AUDIENCE, PROJECT_ID, PROJECT_NUMBER, SERVICE_ACCOUNT, World, build_world
from tests.credentials.support import sample, serve
from tests.helpers import SA_PATH, Mds

DEVELOPER = "dev@example.com"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return build_world(tmp_path)  # real clock: google-auth computes expiry from it


@pytest.fixture
def oauth(world: World) -> FakeOAuthUser:
    return FakeOAuthUser(google=world.google)


@pytest.fixture
def gcloud_client(oauth: FakeOAuthUser) -> OAuthClient:
    return oauth.add_client()


@pytest.fixture
def refresh_token(oauth: FakeOAuthUser, gcloud_client: OAuthClient, world: World) -> str:
    world.google.grant(SERVICE_ACCOUNT, f"user:{DEVELOPER}")
    return oauth.login(DEVELOPER, client=gcloud_client)


@pytest.fixture
async def token_uri(oauth: FakeOAuthUser) -> AsyncIterator[str]:
    async with serve(oauth.app()) as base:
        yield base + "/token"


@pytest.fixture
def adc_file(tmp_path: Path, gcloud_client: OAuthClient, refresh_token: str) -> Path:
    """What ``gcloud auth application-default login`` writes for the developer."""
    path = tmp_path / "application_default_credentials.json"
    path.write_text(json.dumps(FakeOAuthUser.authorized_user_info(client=gcloud_client, refresh_token=refresh_token)))
    return path


def source_for(path: Path, token_url: str | None, metrics: Metrics | None = None) -> GoogleSource:
    return GoogleSource(path=path, quota_project=None, token_url=token_url, clock=SystemClock(),
                        metrics=metrics or create_metrics())


# ---------------------------------------------------------------- the source on its own


async def test_refreshes_the_authorized_user_file_into_a_token_iam_accepts_from_the_developer(
        adc_file: Path, token_uri: str, oauth: FakeOAuthUser, gcloud_client: OAuthClient, refresh_token: str,
        world: World) -> None:
    before = dt.datetime.now(dt.UTC)
    token = await source_for(adc_file, token_uri).federated_token()
    (form,) = oauth.forms
    assert form == {"grant_type": "refresh_token", "client_id": gcloud_client.client_id,
                    "client_secret": gcloud_client.client_secret, "refresh_token": refresh_token,
                    "scope": CLOUD_PLATFORM_SCOPE}
    info = world.google.token_info(token.value)
    assert info is not None and info.principal == f"user:{DEVELOPER}"
    assert info.scopes == (CLOUD_PLATFORM_SCOPE,)
    assert token.expiry.tzinfo is not None  # naive google-auth expiry made aware
    assert 3590 <= (token.expiry - before).total_seconds() <= 3600


async def test_fetch_offers_the_same_token_as_an_access_token_subject(adc_file: Path, token_uri: str) -> None:
    subject = await source_for(adc_file, token_uri).fetch()
    assert subject.token_type == "urn:ietf:params:oauth:token-type:access_token"
    assert subject.value.startswith("ya29.user-") and subject.expiry is not None


async def test_each_call_refreshes_anew_so_concurrent_callers_share_nothing(
        adc_file: Path, token_uri: str, oauth: FakeOAuthUser) -> None:
    source = source_for(adc_file, token_uri)
    first, second = await source.federated_token(), await source.federated_token()
    assert first.value != second.value and oauth.calls["token"] == 2


async def test_a_revoked_login_is_a_permanent_oauth_denial_with_googles_words(
        adc_file: Path, token_uri: str, oauth: FakeOAuthUser, refresh_token: str) -> None:
    oauth.revoke(refresh_token)
    metrics = create_metrics()
    with pytest.raises(UpstreamError) as caught:
        await source_for(adc_file, token_uri, metrics).federated_token()
    error = caught.value
    assert (error.service, error.status, error.error_code, error.permanent) == ("oauth", 400, "invalid_grant", True)
    assert "Token has been expired or revoked." in error.reason
    assert sample(metrics, "metaemu_upstream_errors_total", backend="oauth", status="400") == 1


async def test_an_unreachable_token_endpoint_is_transient(adc_file: Path, refused_port: int) -> None:
    metrics = create_metrics()
    with pytest.raises(UpstreamError) as caught:
        await source_for(adc_file, f"http://127.0.0.1:{refused_port}/token", metrics).federated_token()
    assert (caught.value.service, caught.value.status, caught.value.permanent) == ("oauth", 0, False)
    assert sample(metrics, "metaemu_upstream_errors_total", backend="oauth", status="0") == 1


async def test_a_wrong_client_secret_is_refused_as_invalid_client(
        tmp_path: Path, gcloud_client: OAuthClient, refresh_token: str, token_uri: str) -> None:
    info = FakeOAuthUser.authorized_user_info(client=gcloud_client, refresh_token=refresh_token)
    path = tmp_path / "adc.json"
    path.write_text(json.dumps(info | {"client_secret": "GOCSPX-wrong"}))
    with pytest.raises(UpstreamError) as caught:
        await source_for(path, token_uri).federated_token()
    assert (caught.value.status, caught.value.error_code, caught.value.permanent) == (401, "invalid_client", True)


async def test_missing_credentials_say_how_to_log_in(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as caught:
        await source_for(tmp_path / "absent.json", None).federated_token()
    assert caught.value.permanent and "gcloud auth application-default login" in caught.value.reason


@pytest.mark.parametrize(("content", "words"), [
    ("not json", "is not JSON"),
    (json.dumps({"type": "external_account"}), "'external_account'"),
    (json.dumps({"type": "authorized_user", "client_id": "x"}), "not a usable authorized_user"),
])
async def test_unusable_files_are_permanent_source_errors(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "adc.json"
    path.write_text(content)
    with pytest.raises(SourceError) as caught:
        await source_for(path, None).federated_token()
    assert caught.value.permanent and words in caught.value.reason


async def test_a_service_account_key_goes_through_the_jwt_bearer_grant(
        tmp_path: Path, oauth: FakeOAuthUser, token_uri: str, world: World) -> None:
    # Sent to the key's own token_uri (no token_url override configured), signed by the key.
    path = tmp_path / "key.json"
    path.write_text(json.dumps(oauth.service_account_key(SERVICE_ACCOUNT, token_uri=token_uri)))
    token = await source_for(path, None).federated_token()
    assert oauth.forms[-1]["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    info = world.google.token_info(token.value)
    assert info is not None and info.principal == f"serviceAccount:{SERVICE_ACCOUNT}"
    assert info.scopes == (CLOUD_PLATFORM_SCOPE,)


async def test_a_key_the_endpoint_does_not_know_is_an_invalid_grant(
        tmp_path: Path, oauth: FakeOAuthUser, token_uri: str) -> None:
    pem = new_rsa_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
    key = {"type": "service_account", "project_id": PROJECT_ID, "private_key_id": "k1", "private_key": pem,
           "client_email": SERVICE_ACCOUNT, "client_id": "1", "token_uri": token_uri}
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key))
    with pytest.raises(UpstreamError) as caught:
        await source_for(path, None).federated_token()
    assert (caught.value.error_code, caught.value.permanent) == ("invalid_grant", True)
    assert "account not found" in caught.value.reason


# ---------------------------------------------------------------- configuration


def test_configuration_resolves_the_file_against_the_config_directory(tmp_path: Path) -> None:
    raw = {"type": "google", "credentials_file": "adc.json", "quota_project": "billing-project",
           "token_url": "https://oauth2-example.p.googleapis.com/token"}
    config = parse_source(raw, prefix="workload_identity.source.", base_dir=tmp_path)
    assert config == GoogleSourceConfig(credentials_file=tmp_path / "adc.json", quota_project="billing-project",
                                        token_url="https://oauth2-example.p.googleapis.com/token")
    assert parse_source({"type": "google"}, prefix="p.", base_dir=tmp_path) == GoogleSourceConfig()


@pytest.mark.parametrize(("raw", "key"), [
    ({"type": "google", "scopes": []}, "p.scopes"),
    ({"type": "google", "credentials_file": ""}, "p.credentials_file"),
    ({"type": "google", "quota_project": 7}, "p.quota_project"),
    ({"type": "google", "token_url": "oauth2.googleapis.com/token"}, "p.token_url"),
])
def test_configuration_errors_name_the_key(raw: dict[str, Any], key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_google_config(raw, prefix="p.", base_dir=tmp_path)
    assert caught.value.key == key


def test_the_adc_lookup_follows_google_auth_without_the_metadata_server_fallback(tmp_path: Path) -> None:
    assert adc_path({"GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "CLOUDSDK_CONFIG": "/g"}) == Path("/k.json")
    assert adc_path({"CLOUDSDK_CONFIG": "/g"}) == Path("/g/application_default_credentials.json")
    assert adc_path({}) == Path.home() / ".config/gcloud/application_default_credentials.json"


def test_build_source_dispatches_to_the_google_module(adc_file: Path) -> None:
    context = SourceContext(clock=SystemClock(), http=None, metrics=create_metrics(),  # type: ignore[arg-type]
                            audience=AUDIENCE)
    config = GoogleSourceConfig(credentials_file=adc_file)
    source = build_source(config, context)
    assert isinstance(source, GoogleSource) and source.kind == "google"
    assert isinstance(build(config, context), GoogleSource)


# ---------------------------------------------------------------- through a running metaemu


def metaemu_config(adc: Path, token_url: str, *, impersonate: bool, **source: Any) -> dict[str, Any]:
    wi: dict[str, Any] = {"audience": AUDIENCE, "source": {"type": "google", "credentials_file": str(adc),
                                                           "token_url": token_url, **source}}
    if impersonate:
        wi["service_account"] = SERVICE_ACCOUNT
    return {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "project_id": PROJECT_ID,
            "numeric_project_id": PROJECT_NUMBER, "workload_identity": wi,
            "endpoints": {"sts": "http://sts.googleapis.test/v1/token",
                          "iam_credentials": "http://iamcredentials.test/v1"}}


@contextlib.asynccontextmanager
async def running(world: World, adc: Path, token_url: str, *, impersonate: bool,
                  **source: Any) -> AsyncIterator[tuple[MetaemuServer, Mds]]:
    config = parse_config(metaemu_config(adc, token_url, impersonate=impersonate, **source), hostname="laptop",
                          base_dir=adc.parent)
    async with MetaemuServer(config, http=world.google.client()) as server:
        mds = Mds(server.metadata_url)
        try:
            yield server, mds
        finally:
            await mds.close()


async def test_impersonates_the_service_account_with_the_developers_token_as_bearer(
        world: World, adc_file: Path, token_uri: str) -> None:
    async with running(world, adc_file, token_uri, impersonate=True) as (_, mds):
        reply = await mds.get(SA_PATH + "token")
        assert reply.status == 200, reply.text
        info = world.google.token_info(json.loads(reply.body)["access_token"])
        assert info is not None and (info.kind, info.email) == ("service_account", SERVICE_ACCOUNT)
        identity = await mds.get(SA_PATH + "identity?audience=https://svc.example")
        assert identity.status == 200 and identity.text.count(".") == 2
    (call,) = [r for r in world.google.requests if r.endpoint == "generateAccessToken"]
    assert call.headers["Authorization"].startswith("Bearer ya29.user-")
    assert world.google.calls["sts"] == 0  # the ADC token is never exchanged at STS


@pytest.mark.parametrize(("in_file", "configured", "expected"), [
    (None, None, None),
    ("file-project", None, "file-project"),  # gcloud auth application-default set-quota-project
    ("file-project", "billing-project", "billing-project"),  # source.quota_project overrides the file
    (None, "billing-project", "billing-project"),
])
async def test_iam_calls_bill_the_quota_project_as_google_auth_would(
        world: World, tmp_path: Path, gcloud_client: OAuthClient, refresh_token: str, token_uri: str,
        in_file: str | None, configured: str | None, expected: str | None) -> None:
    """End-user credentials name a quota project in ``x-goog-user-project`` on every IAM call, as
    google-auth's ``apply`` does for them; without one, no header."""
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps(FakeOAuthUser.authorized_user_info(client=gcloud_client, refresh_token=refresh_token,
                                                                 quota_project_id=in_file)))
    extra = {"quota_project": configured} if configured else {}
    async with running(world, adc, token_uri, impersonate=True, **extra) as (_, mds):
        assert (await mds.get(SA_PATH + "token")).status == 200
        assert (await mds.get(SA_PATH + "identity?audience=https://svc.example")).status == 200
    calls = [r for r in world.google.requests if r.endpoint in ("generateAccessToken", "generateIdToken")]
    assert len(calls) == 2
    for call in calls:
        headers = {k.lower(): v for k, v in call.headers.items()}
        assert headers.get("x-goog-user-project") == expected, call.endpoint


async def test_without_a_service_account_the_developers_token_is_served_and_identity_explains(
        world: World, adc_file: Path, token_uri: str) -> None:
    async with running(world, adc_file, token_uri, impersonate=False) as (_, mds):
        reply = await mds.get(SA_PATH + "token")
        assert reply.status == 200, reply.text
        info = world.google.token_info(json.loads(reply.body)["access_token"])
        assert info is not None and info.principal == f"user:{DEVELOPER}"
        identity = await mds.get(SA_PATH + "identity?audience=https://svc.example")
        assert identity.status == 404 and "workload_identity.service_account" in identity.text


async def test_a_down_token_endpoint_answers_503_and_counts_it(world: World, adc_file: Path,
                                                                refused_port: int) -> None:
    async with running(world, adc_file, f"http://127.0.0.1:{refused_port}/token", impersonate=True) as (server, mds):
        reply = await mds.get(SA_PATH + "token")
        assert reply.status == 503 and "oauth unreachable" in reply.text
        assert reply.headers["Retry-After"]
        assert sample(server.metrics, "metaemu_upstream_errors_total", backend="oauth", status="0") >= 1


async def test_a_revoked_login_answers_403_with_the_reason(world: World, adc_file: Path, token_uri: str,
                                                           oauth: FakeOAuthUser, refresh_token: str) -> None:
    oauth.revoke(refresh_token)
    async with running(world, adc_file, token_uri, impersonate=True) as (server, mds):
        reply = await mds.get(SA_PATH + "token")
        assert reply.status == 403
        assert "invalid_grant" in reply.text and "Token has been expired or revoked." in reply.text
        assert sample(server.metrics, "metaemu_upstream_errors_total", backend="oauth", status="400") >= 1


async def test_no_token_material_reaches_the_logs(world: World, adc_file: Path, token_uri: str,
                                                  oauth: FakeOAuthUser, gcloud_client: OAuthClient,
                                                  refresh_token: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(world, adc_file, token_uri, impersonate=True) as (_, mds):
        token = json.loads((await mds.get(SA_PATH + "token")).body)["access_token"]
        oauth.revoke(refresh_token)  # and a failing refresh after it
        with contextlib.suppress(UpstreamError):
            await source_for(adc_file, token_uri).federated_token()
    issued = [form for form in oauth.forms if form.get("refresh_token")]
    secrets_seen = {token, refresh_token, gcloud_client.client_secret}
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert caplog.records and issued
    for secret in secrets_seen:
        assert secret not in text
    assert "ya29." not in text


