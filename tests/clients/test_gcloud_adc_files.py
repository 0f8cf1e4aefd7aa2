"""Real clients against a metaemu whose ``google`` source holds an ADC file gcloud wrote (issue #14):
python google-auth (``compute_engine`` credentials, ``IDTokenCredentials``, ``fetch_id_token``) and
google-cloud-storage, pointed at metaemu with ``GCE_METADATA_HOST/IP/ROOT`` (``python_client.py``).

The impersonated file is gcloud 528's (``tests/credentials/sources/gcloud_528``), and, where gcloud
is installed, one gcloud writes during the test: ``gcloud auth application-default login
--no-launch-browser --impersonate-service-account=DELEGATE,TARGET`` (or ``--login-config`` for a
workforce login) against the OAuth and STS stand-ins, with the authorization code on stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from metaemu.config import parse_config
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_google_workforce import FakeWorkforceSts, workforce_principal
from metaemu.testing.fake_oauth_user import FakeOAuthUser, OAuthClient
from metaemu.testing.fake_storage import FakeStorage
from metaemu.testing.world import PROJECT_ID, PROJECT_NUMBER, World
from tests.clients import harness
from tests.clients.conftest import AUDIENCE, BUCKET, PYTHON_CLIENT, storage_stand_in
from tests.credentials.sources.gcloud_adc import (
    WORKFORCE_AUDIENCE,
    adc_client,
    gcloud_path,
    gcloud_written,
    workforce_client,
    write_with_gcloud,
)
from tests.credentials.support import serve

DEVELOPER = "dev@example.com"
TARGET = "target@p.iam.gserviceaccount.com"
DELEGATE = "d1@p.iam.gserviceaccount.com"
WORKFORCE_SUBJECT = "alice@corp.example"
needs_gcloud = pytest.mark.skipif(gcloud_path() is None, reason="gcloud is not installed")


@dataclass
class Google:
    world: World
    oauth: FakeOAuthUser
    client: OAuthClient
    token_url: str
    workforce: FakeWorkforceSts
    workforce_url: str
    storage: FakeStorage
    storage_url: str


@pytest.fixture
async def google(world: World) -> AsyncIterator[Google]:
    for account in (TARGET, DELEGATE):
        world.google.add_service_account(account)
    world.google.grant(DELEGATE, f"user:{DEVELOPER}")
    world.google.grant(TARGET, f"serviceAccount:{DELEGATE}")
    oauth = FakeOAuthUser(google=world.google)
    client_id, secret = adc_client()
    client = oauth.add_client(client_id, secret=secret)
    workforce = FakeWorkforceSts(google=world.google)
    wf_id, wf_secret = workforce_client()
    workforce.add_client(wf_id, secret=wf_secret)
    async with storage_stand_in(world.google) as (storage, storage_url), serve(oauth.app()) as oauth_base, \
            serve(workforce.app()) as wf_base:
        yield Google(world, oauth, client, oauth_base + "/token", workforce, wf_base, storage, storage_url)


@contextlib.asynccontextmanager
async def metaemu(google: Google, adc: Path, *, token_url: str | None) -> AsyncIterator[MetaemuServer]:
    source: dict[str, Any] = {"type": "google", "credentials_file": str(adc)}
    if token_url:
        source["token_url"] = token_url  # google-auth ignores a user login's own token_uri
    raw = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "project_id": PROJECT_ID,
           "numeric_project_id": PROJECT_NUMBER, "workload_identity": {"source": source},
           "endpoints": {"sts": "http://sts.googleapis.test/v1/token", "iam_credentials": "http://iamcredentials.test/v1"}}
    server = MetaemuServer(parse_config(raw, hostname="laptop", base_dir=adc.parent), http=google.world.google.client())
    async with server:
        yield server


async def python_client(server: MetaemuServer, google: Google, tmp_path: Path) -> dict[str, Any]:
    env = harness.client_env(str(server.metadata_address), tmp_path)
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(PYTHON_CLIENT), AUDIENCE, google.storage_url, BUCKET],
        env=env, capture_output=True, text=True, timeout=harness.DEFAULT_TIMEOUT)
    out: dict[str, Any] = json.loads(proc.stdout or "{}")
    out["returncode"] = proc.returncode
    return out


def verified_id_token(google: Google, token: str) -> dict[str, Any]:
    key = jwt.PyJWKSet.from_dict(google.world.google.google_jwks()).keys[0]
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["RS256"], audience=AUDIENCE,
                                        issuer="https://accounts.google.com")
    return claims


def assert_served_as_target(out: dict[str, Any], google: Google) -> None:
    assert out["returncode"] == 0, out
    assert out["adc_type"] == "Credentials" and out["project"] == PROJECT_ID
    assert (out["email"], out["ce_email"]) == (TARGET, TARGET)
    token = google.world.google.token_info(out["ce_token"])
    assert token is not None and token.email == TARGET
    for field in ("id_token", "fetched_id_token"):
        assert verified_id_token(google, out[field])["email"] == TARGET  # format=full
    assert (out["blobs"], out["bucket"]) == (["hello.txt"], BUCKET)
    seen = google.world.google.token_info(google.storage.seen_tokens[-1])
    assert seen is not None and seen.email == TARGET and any("devstorage" in s for s in seen.scopes)
    chain = [r.json["delegates"] for r in google.world.google.requests
             if r.endpoint in ("generateAccessToken", "generateIdToken")]
    assert chain and all(d == [f"projects/-/serviceAccounts/{DELEGATE}"] for d in chain)


async def test_python_clients_get_the_targets_token_email_and_id_token_from_gclouds_impersonated_file(
        google: Google, tmp_path: Path) -> None:
    info = gcloud_written("impersonated_service_account")
    info["source_credentials"]["refresh_token"] = google.oauth.login(DEVELOPER, client=google.client)
    adc = tmp_path / "application_default_credentials.json"
    adc.write_text(json.dumps(info))
    async with metaemu(google, adc, token_url=google.token_url) as server:
        out = await python_client(server, google, tmp_path)
    assert_served_as_target(out, google)


@needs_gcloud
async def test_a_file_gcloud_writes_now_with_delegates_serves_python_clients(
        google: Google, tmp_path: Path, refused_port: int) -> None:
    code = google.oauth.authorization_code(DEVELOPER, client=google.client)
    info = await asyncio.to_thread(
        write_with_gcloud, tmp_path / "gcloud", code=code, token_host=google.token_url,
        metadata_root=f"127.0.0.1:{refused_port}", args=[f"--impersonate-service-account={DELEGATE},{TARGET}"])
    assert info["type"] == "impersonated_service_account" and info["delegates"] == [DELEGATE]
    adc = tmp_path / "gcloud" / "application_default_credentials.json"
    async with metaemu(google, adc, token_url=google.token_url) as server:
        out = await python_client(server, google, tmp_path)
    assert_served_as_target(out, google)


@needs_gcloud
async def test_a_workforce_login_gcloud_writes_now_serves_its_token_and_no_identity(
        google: Google, tmp_path: Path, refused_port: int) -> None:
    login_config = tmp_path / "login-config.json"
    login_config.write_text(json.dumps({
        "type": "external_account_authorized_user_login_config", "audience": WORKFORCE_AUDIENCE,
        "auth_url": "https://auth.cloud.google/authorize", "token_url": f"{google.workforce_url}/v1/oauthtoken",
        "token_info_url": f"{google.workforce_url}/v1/introspect", "universe_domain": "googleapis.com"}))
    client_id, secret = workforce_client()
    code = google.workforce.authorization_code(WORKFORCE_SUBJECT, audience=WORKFORCE_AUDIENCE,
                                               client=google.workforce.add_client(client_id, secret=secret))
    info = await asyncio.to_thread(
        write_with_gcloud, tmp_path / "gcloud", code=code, token_host=google.token_url,
        metadata_root=f"127.0.0.1:{refused_port}", args=[f"--login-config={login_config}"])
    assert info["type"] == "external_account_authorized_user"
    async with metaemu(google, tmp_path / "gcloud" / "application_default_credentials.json", token_url=None) as server:
        out = await python_client(server, google, tmp_path)
    # The workforce token and the pool's name as email (GKE-05); google-auth's ID-token client then
    # fails on the metadata server's 404 (GKE-06), as it would on GKE for an unannotated account.
    assert out["stage"] == "id_token_credentials" and "404" in out["error"], out
    assert out["ce_email"] == f"{PROJECT_ID}.svc.id.goog"
    token = google.world.google.token_info(out["ce_token"])
    assert token is not None and token.principal == workforce_principal(WORKFORCE_AUDIENCE, WORKFORCE_SUBJECT)
    assert [f["grant_type"] for f in google.workforce.forms] == ["authorization_code", "refresh_token"]
