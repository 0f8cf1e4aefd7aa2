"""The ``google`` source with every file gcloud writes for ADC (issue #14): an
``impersonated_service_account`` file (``--impersonate-service-account``, delegates included) and an
``external_account_authorized_user`` file (a workforce identity federation login), each as
gcloud 528 wrote it (``gcloud_528/``, see ``gcloud_adc``), refreshed by google-auth against the
stand-ins and served by a running metaemu.

google-auth keeps expiry on the real clock, so these tests run on ``SystemClock``.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web

from metaemu.clock import SystemClock
from metaemu.config import parse_config
from metaemu.credentials.impersonation import Impersonation
from metaemu.credentials.sources import SourceContext
from metaemu.credentials.sources.google import GoogleSource, GoogleSourceConfig, build, declared_impersonation
from metaemu.credentials.sources.google_adc import parse_adc
from metaemu.errors import ConfigError, SourceError, UpstreamError
from metaemu.metrics import create_metrics
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_google_workforce import FakeWorkforceSts, workforce_principal
from metaemu.testing.fake_oauth_user import FakeOAuthUser, OAuthClient
from metaemu.testing.world import PROJECT_ID, PROJECT_NUMBER, World, build_world
from tests.credentials.sources.gcloud_adc import (
    WORKFORCE_AUDIENCE,
    adc_client,
    gcloud_written,
    with_workforce_endpoint,
    workforce_client,
)
from tests.credentials.support import serve
from tests.helpers import SA_PATH, Mds

DEVELOPER = "dev@example.com"
#: The accounts gcloud was told to impersonate: --impersonate-service-account=DELEGATE,TARGET.
TARGET = "target@p.iam.gserviceaccount.com"
DELEGATE = "d1@p.iam.gserviceaccount.com"
WORKFORCE_SUBJECT = "alice@corp.example"
CLOUD = "https://www.googleapis.com/auth/cloud-platform"
STORAGE = "https://www.googleapis.com/auth/devstorage.read_only"
AUDIENCE = "https://svc.example"


@pytest.fixture
def world(tmp_path: Path) -> World:
    world = build_world(tmp_path)  # real clock: google-auth computes expiry from it
    for account in (TARGET, DELEGATE):
        world.google.add_service_account(account)
    return world


@pytest.fixture
def oauth(world: World) -> FakeOAuthUser:
    return FakeOAuthUser(google=world.google)


@pytest.fixture
def gcloud_client(oauth: FakeOAuthUser) -> OAuthClient:
    client_id, secret = adc_client()
    return oauth.add_client(client_id, secret=secret)


@pytest.fixture
def refresh_token(oauth: FakeOAuthUser, gcloud_client: OAuthClient) -> str:
    return oauth.login(DEVELOPER, client=gcloud_client)


@pytest.fixture
async def token_uri(oauth: FakeOAuthUser) -> AsyncIterator[str]:
    async with serve(oauth.app()) as base:
        yield base + "/token"


@pytest.fixture
def workforce(world: World) -> FakeWorkforceSts:
    return FakeWorkforceSts(google=world.google)


@pytest.fixture
def workforce_login(workforce: FakeWorkforceSts) -> str:
    client_id, secret = workforce_client()
    return workforce.login(WORKFORCE_SUBJECT, audience=WORKFORCE_AUDIENCE,
                           client=workforce.add_client(client_id, secret=secret))


@pytest.fixture
async def sts_base(workforce: FakeWorkforceSts) -> AsyncIterator[str]:
    async with serve(workforce.app()) as base:
        yield base


def grant_chain(world: World, caller: str) -> None:
    """caller -> DELEGATE -> TARGET, each hop with Token Creator on the next."""
    world.google.grant(DELEGATE, caller)
    world.google.grant(TARGET, f"serviceAccount:{DELEGATE}")


def write(tmp_path: Path, info: dict[str, Any], name: str = "adc.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(info, indent=2))
    return path


def impersonated_file(tmp_path: Path, refresh_token: str) -> Path:
    info = gcloud_written("impersonated_service_account")
    info["source_credentials"]["refresh_token"] = refresh_token
    return write(tmp_path, info)


def source_for(path: Path, token_url: str | None = None) -> GoogleSource:
    return GoogleSource(path=path, quota_project=None, token_url=token_url, clock=SystemClock(),
                        metrics=create_metrics(), impersonation=declared_impersonation(path))


# ---------------------------------------------------------------- what the files say


def test_the_impersonated_file_gcloud_wrote_names_the_target_from_its_url_and_the_delegates() -> None:
    info = gcloud_written("impersonated_service_account")
    adc = parse_adc(info, Path("adc.json"))
    assert (adc.kind, adc.impersonation) == ("authorized_user", Impersonation(service_account=TARGET,
                                                                              delegates=(DELEGATE,)))
    assert adc.info is info["source_credentials"]
    nested = parse_adc(gcloud_written("impersonated_external_account_authorized_user"), Path("adc.json"))
    assert (nested.kind, nested.impersonation) == ("external_account_authorized_user",
                                                   Impersonation(service_account=TARGET))


def test_the_workforce_file_gcloud_wrote_is_refreshable_as_it_is() -> None:
    adc = parse_adc(gcloud_written("external_account_authorized_user"), Path("adc.json"))
    assert (adc.kind, adc.impersonation) == ("external_account_authorized_user", None)


@pytest.mark.parametrize(("change", "words"), [
    ({"service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/x"}, "is not https://"),
    ({"service_account_impersonation_url": "https://[::1/v1/projects/-/serviceAccounts/a:generateAccessToken"},
     "is not https://"),
    ({"delegates": ["projects/my-project/serviceAccounts/d1@p.iam.gserviceaccount.com"]}, "the - wildcard"),
    ({"delegates": "d1@p.iam.gserviceaccount.com"}, "must be a list"),
    ({"source_credentials": {"type": "external_account"}}, "not 'external_account'"),
    ({"source_credentials": None}, "without source_credentials"),
], ids=["url", "url-unparsable", "delegate-project", "delegates-string", "source-type", "no-source"])
def test_unusable_impersonated_files_are_permanent_source_errors(change: dict[str, Any], words: str) -> None:
    with pytest.raises(SourceError) as caught:
        parse_adc(gcloud_written("impersonated_service_account") | change, Path("adc.json"))
    assert caught.value.permanent and words in caught.value.reason


def test_resource_name_delegates_are_read_as_the_accounts_they_name() -> None:
    info = gcloud_written("impersonated_service_account") | {"delegates": [f"projects/-/serviceAccounts/{DELEGATE}"]}
    adc = parse_adc(info, Path("adc.json"))
    assert adc.impersonation is not None and adc.impersonation.delegates == (DELEGATE,)


# ---------------------------------------------------------------- the source on its own


async def test_a_workforce_login_refreshes_at_sts_oauthtoken_with_gclouds_client_in_basic_auth(
        tmp_path: Path, workforce: FakeWorkforceSts, workforce_login: str, sts_base: str, world: World) -> None:
    info = with_workforce_endpoint(gcloud_written("external_account_authorized_user"), base_url=sts_base,
                                   refresh_token=workforce_login)
    token = await source_for(write(tmp_path, info)).federated_token()
    assert workforce.forms == [{"grant_type": "refresh_token", "refresh_token": workforce_login}]
    client_id, secret = workforce_client()
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    assert workforce.headers[0]["Authorization"] == f"Basic {basic}"
    seen = world.google.token_info(token.value)
    assert seen is not None and seen.principal == workforce_principal(WORKFORCE_AUDIENCE, WORKFORCE_SUBJECT)


async def test_a_revoked_workforce_login_is_a_permanent_oauth_denial_with_the_sts_answer(
        tmp_path: Path, workforce: FakeWorkforceSts, workforce_login: str, sts_base: str) -> None:
    workforce.revoke(workforce_login)
    info = with_workforce_endpoint(gcloud_written("external_account_authorized_user"), base_url=sts_base,
                                   refresh_token=workforce_login)
    with pytest.raises(UpstreamError) as caught:  # google-auth raises OAuthError here, not RefreshError
        await source_for(write(tmp_path, info)).federated_token()
    assert (caught.value.service, caught.value.status, caught.value.error_code, caught.value.permanent) == (
        "oauth", 400, "invalid_grant", True)


async def test_a_wrong_workforce_client_secret_is_refused_as_invalid_client(
        tmp_path: Path, workforce_login: str, sts_base: str) -> None:
    info = with_workforce_endpoint(gcloud_written("external_account_authorized_user"), base_url=sts_base,
                                   refresh_token=workforce_login) | {"client_secret": "not-gclouds"}
    with pytest.raises(UpstreamError) as caught:
        await source_for(write(tmp_path, info)).federated_token()
    assert (caught.value.status, caught.value.error_code, caught.value.permanent) == (401, "invalid_client", True)


async def test_an_impersonated_file_refreshes_its_source_credentials_and_declares_its_chain(
        tmp_path: Path, token_uri: str, refresh_token: str, oauth: FakeOAuthUser, world: World) -> None:
    source = source_for(impersonated_file(tmp_path, refresh_token), token_uri)
    assert source.impersonation() == Impersonation(service_account=TARGET, delegates=(DELEGATE,))
    token = await source.federated_token()
    assert oauth.forms[-1]["refresh_token"] == refresh_token
    seen = world.google.token_info(token.value)
    assert seen is not None and seen.principal == f"user:{DEVELOPER}"


async def test_a_file_that_now_impersonates_another_account_is_refused_until_restart(
        tmp_path: Path, token_uri: str, refresh_token: str, oauth: FakeOAuthUser) -> None:
    path = impersonated_file(tmp_path, refresh_token)
    source = source_for(path, token_uri)
    info = json.loads(path.read_text()) | {"delegates": []}  # gcloud login again, another chain
    path.write_text(json.dumps(info))
    with pytest.raises(SourceError) as caught:
        await source.federated_token()
    assert caught.value.permanent and "restart" in caught.value.reason and TARGET in caught.value.reason
    assert oauth.calls["token"] == 0


async def test_an_impersonated_file_with_a_key_inside_signs_a_jwt_bearer_grant(
        tmp_path: Path, oauth: FakeOAuthUser, token_uri: str, world: World) -> None:
    key = oauth.service_account_key(DELEGATE, token_uri=token_uri)
    info = gcloud_written("impersonated_service_account") | {"source_credentials": key, "delegates": []}
    source = source_for(write(tmp_path, info))
    assert source.impersonation() == Impersonation(service_account=TARGET)
    token = await source.federated_token()
    assert oauth.forms[-1]["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    seen = world.google.token_info(token.value)
    assert seen is not None and seen.principal == f"serviceAccount:{DELEGATE}"


# ---------------------------------------------------------------- through a running metaemu


@contextlib.asynccontextmanager
async def running(world: World, adc: Path, *, token_url: str | None = None,
                  service_account: str | None = None) -> AsyncIterator[Mds]:
    source: dict[str, Any] = {"type": "google", "credentials_file": str(adc)}
    if token_url:
        source["token_url"] = token_url
    wi: dict[str, Any] = {"source": source}
    if service_account:
        wi["service_account"] = service_account
    raw = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "project_id": PROJECT_ID,
           "numeric_project_id": PROJECT_NUMBER, "workload_identity": wi,
           "endpoints": {"sts": "http://sts.googleapis.test/v1/token", "iam_credentials": "http://iamcredentials.test/v1"}}
    config = parse_config(raw, hostname="laptop", base_dir=adc.parent)
    async with MetaemuServer(config, http=world.google.client()) as server:
        mds = Mds(server.metadata_url)
        try:
            yield mds
        finally:
            await mds.close()


def id_claims(world: World, token: str) -> dict[str, Any]:
    key = jwt.PyJWKSet.from_dict(world.google.google_jwks()).keys[0]
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["RS256"], audience=AUDIENCE,
                                        issuer="https://accounts.google.com")
    return claims


async def test_an_impersonated_file_serves_the_target_its_requested_scopes_and_id_tokens_through_the_delegates(
        world: World, tmp_path: Path, token_uri: str, refresh_token: str) -> None:
    grant_chain(world, f"user:{DEVELOPER}")
    async with running(world, impersonated_file(tmp_path, refresh_token), token_url=token_uri) as mds:
        email = await mds.get(SA_PATH + "email")
        assert (email.status, email.text) == (200, TARGET)
        info = json.loads((await mds.get(SA_PATH + "?recursive=true")).body)
        assert info["email"] == TARGET
        for scopes in ((CLOUD,), (STORAGE,)):
            reply = await mds.get(SA_PATH + "token?scopes=" + ",".join(scopes))
            assert reply.status == 200, reply.text
            seen = world.google.token_info(json.loads(reply.body)["access_token"])
            assert seen is not None and (seen.email, seen.scopes) == (TARGET, scopes)
        full = await mds.get(SA_PATH + f"identity?audience={AUDIENCE}&format=full")
        assert full.status == 200, full.text
        assert id_claims(world, full.text)["email"] == TARGET
        standard = await mds.get(SA_PATH + f"identity?audience={AUDIENCE}")
        assert standard.status == 200 and "email" not in id_claims(world, standard.text)
    calls = [r for r in world.google.requests if r.endpoint in ("generateAccessToken", "generateIdToken")]
    assert {r.endpoint for r in calls} == {"generateAccessToken", "generateIdToken"}
    for call in calls:
        assert call.account == TARGET
        assert call.json["delegates"] == [f"projects/-/serviceAccounts/{DELEGATE}"]
        assert call.headers["Authorization"].startswith("Bearer ya29.user-")  # the developer's token
    assert world.google.calls["sts"] == 0


@pytest.mark.parametrize("missing", ["user->delegate", "delegate->target"])
async def test_a_missing_binding_on_either_hop_answers_403_with_iams_words(
        world: World, tmp_path: Path, token_uri: str, refresh_token: str, missing: str) -> None:
    if missing != "user->delegate":
        world.google.grant(DELEGATE, f"user:{DEVELOPER}")
    if missing != "delegate->target":
        world.google.grant(TARGET, f"serviceAccount:{DELEGATE}")
    async with running(world, impersonated_file(tmp_path, refresh_token), token_url=token_uri) as mds:
        reply = await mds.get(SA_PATH + "token")
        identity = await mds.get(SA_PATH + f"identity?audience={AUDIENCE}")
    assert reply.status == 403
    assert reply.text == (
        "Unable to generate access token; iam returned 403: Permission 'iam.serviceAccounts.getAccessToken' "
        "denied on resource "
        "(or it may not exist).\nThis error could be caused by a missing IAM policy binding on the target IAM "
        "service account (roles/iam.workloadIdentityUser for the federated principal), or, for a user login or "
        "along a delegation chain, a missing roles/iam.serviceAccountTokenCreator on the next service account "
        "in the chain.\n")
    assert identity.status == 403
    assert identity.text.startswith("Unable to generate ID token; iam returned 403: Permission "
                                    "'iam.serviceAccounts.getOpenIdToken' denied on resource (or it may not exist).\n")


async def test_the_impersonated_workforce_file_gcloud_wrote_impersonates_with_the_workforce_token(
        world: World, tmp_path: Path, workforce_login: str, sts_base: str) -> None:
    info = with_workforce_endpoint(gcloud_written("impersonated_external_account_authorized_user"),
                                   base_url=sts_base, refresh_token=workforce_login)
    world.google.grant(TARGET, workforce_principal(WORKFORCE_AUDIENCE, WORKFORCE_SUBJECT))
    async with running(world, write(tmp_path, info)) as mds:
        assert (await mds.get(SA_PATH + "email")).text == TARGET
        reply = await mds.get(SA_PATH + "token")
        assert reply.status == 200, reply.text
        seen = world.google.token_info(json.loads(reply.body)["access_token"])
        assert seen is not None and seen.email == TARGET
        identity = await mds.get(SA_PATH + f"identity?audience={AUDIENCE}&format=full")
        assert identity.status == 200 and id_claims(world, identity.text)["email"] == TARGET
    (call, *_) = [r for r in world.google.requests if r.endpoint == "generateAccessToken"]
    assert call.json["delegates"] == [] and call.headers["Authorization"].startswith("Bearer ya29.wf-")


async def test_a_workforce_file_serves_the_sts_token_as_is_under_the_pool_email_and_has_no_identity(
        world: World, tmp_path: Path, workforce_login: str, sts_base: str) -> None:
    info = with_workforce_endpoint(gcloud_written("external_account_authorized_user"), base_url=sts_base,
                                   refresh_token=workforce_login)
    async with running(world, write(tmp_path, info)) as mds:
        reply = await mds.get(SA_PATH + "token")
        assert reply.status == 200, reply.text
        seen = world.google.token_info(json.loads(reply.body)["access_token"])
        assert seen is not None and seen.principal == workforce_principal(WORKFORCE_AUDIENCE, WORKFORCE_SUBJECT)
        # GKE-05: a principal that is not a service account is served as the workload pool.
        assert (await mds.get(SA_PATH + "email")).text == f"{PROJECT_ID}.svc.id.goog"
        identity = await mds.get(SA_PATH + f"identity?audience={AUDIENCE}")
        assert identity.status == 404  # GKE-06, exactly as for any federated principal
        assert identity.text == ("Identity tokens need a Google service account: this metadata server serves a "
                                 "federated principal, and no workload_identity.service_account is configured to "
                                 "impersonate (GKE-06).\n")
    assert world.google.calls["generateAccessToken"] == world.google.calls["generateIdToken"] == 0


async def test_a_workforce_file_with_a_configured_service_account_impersonates_it(
        world: World, tmp_path: Path, workforce_login: str, sts_base: str) -> None:
    info = with_workforce_endpoint(gcloud_written("external_account_authorized_user"), base_url=sts_base,
                                   refresh_token=workforce_login)
    world.google.grant(TARGET, workforce_principal(WORKFORCE_AUDIENCE, WORKFORCE_SUBJECT))
    async with running(world, write(tmp_path, info), service_account=TARGET) as mds:
        assert (await mds.get(SA_PATH + "email")).text == TARGET
        identity = await mds.get(SA_PATH + f"identity?audience={AUDIENCE}&format=full")
        assert identity.status == 200 and id_claims(world, identity.text)["email"] == TARGET


async def test_a_configured_service_account_other_than_the_files_target_is_a_config_error(
        world: World, tmp_path: Path, refresh_token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        async with running(world, impersonated_file(tmp_path, refresh_token),
                           service_account=f"other@{PROJECT_ID}.iam.gserviceaccount.com"):
            pass
    assert caught.value.key == "workload_identity.service_account" and TARGET in str(caught.value)


def test_build_reads_the_chain_once_at_assembly(tmp_path: Path, refresh_token: str) -> None:
    path = impersonated_file(tmp_path, refresh_token)
    context = SourceContext(clock=SystemClock(), http=None, metrics=create_metrics(),  # type: ignore[arg-type]
                            audience="")
    source = build(GoogleSourceConfig(credentials_file=path), context)
    path.unlink()
    assert source.impersonation() == Impersonation(service_account=TARGET, delegates=(DELEGATE,))
    assert build(GoogleSourceConfig(credentials_file=path), context).impersonation() is None


@pytest.mark.parametrize(("in_file", "configured", "expected"), [
    (None, None, None), ("wf-billing", None, "wf-billing"), ("wf-billing", "override", "override")])
async def test_a_workforce_logins_quota_project_is_billed_on_iam_calls(
        world: World, tmp_path: Path, workforce_login: str, sts_base: str, in_file: str | None,
        configured: str | None, expected: str | None) -> None:
    info = with_workforce_endpoint(gcloud_written("external_account_authorized_user"), base_url=sts_base,
                                   refresh_token=workforce_login)
    if in_file:
        info["quota_project_id"] = in_file  # gcloud auth application-default set-quota-project
    adc = write(tmp_path, info)
    world.google.grant(TARGET, workforce_principal(WORKFORCE_AUDIENCE, WORKFORCE_SUBJECT))
    source: dict[str, Any] = {"type": "google", "credentials_file": str(adc)}
    if configured:
        source["quota_project"] = configured
    raw = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "project_id": PROJECT_ID,
           "numeric_project_id": PROJECT_NUMBER, "workload_identity": {"source": source, "service_account": TARGET},
           "endpoints": {"sts": "http://sts.googleapis.test/v1/token", "iam_credentials": "http://iamcredentials.test/v1"}}
    async with MetaemuServer(parse_config(raw, hostname="laptop", base_dir=tmp_path),
                             http=world.google.client()) as server:
        mds = Mds(server.metadata_url)
        try:
            assert (await mds.get(SA_PATH + "token")).status == 200
        finally:
            await mds.close()
    (call, *_) = [r for r in world.google.requests if r.endpoint == "generateAccessToken"]
    assert {k.lower(): v for k, v in call.headers.items()}.get("x-goog-user-project") == expected


async def test_a_malformed_200_from_the_workforce_token_endpoint_is_a_transient_source_error(
        tmp_path: Path) -> None:
    async def no_expiry(_: web.Request) -> web.Response:
        return web.json_response({"access_token": "ya29.x", "token_type": "Bearer"})  # no expires_in

    app = web.Application()
    app.router.add_post("/v1/oauthtoken", no_expiry)
    async with serve(app) as base:
        info = with_workforce_endpoint(gcloud_written("external_account_authorized_user"), base_url=base,
                                       refresh_token="wf-rt-any")
        with pytest.raises(SourceError) as caught:
            await source_for(write(tmp_path, info)).federated_token()
    assert not caught.value.permanent and "malformed token response" in caught.value.reason


async def test_an_impersonated_file_with_a_key_inside_serves_the_target_through_metaemu(
        world: World, tmp_path: Path, oauth: FakeOAuthUser, token_uri: str) -> None:
    key = oauth.service_account_key(DELEGATE, token_uri=token_uri)
    info = gcloud_written("impersonated_service_account") | {"source_credentials": key, "delegates": []}
    world.google.grant(TARGET, f"serviceAccount:{DELEGATE}")
    async with running(world, write(tmp_path, info)) as mds:
        assert (await mds.get(SA_PATH + "email")).text == TARGET
        reply = await mds.get(SA_PATH + "token")
        assert reply.status == 200, reply.text
        seen = world.google.token_info(json.loads(reply.body)["access_token"])
        assert seen is not None and seen.email == TARGET
        identity = await mds.get(SA_PATH + f"identity?audience={AUDIENCE}&format=full")
        assert identity.status == 200 and id_claims(world, identity.text)["email"] == TARGET
    world.google.revoke(TARGET, f"serviceAccount:{DELEGATE}")
