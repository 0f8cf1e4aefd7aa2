"""Real, unmodified client libraries against a running metaemu (clients.md CL-01..CL-13): each
obtains an access token, an ID token, the account email and the project id. The clients are the
judges: what they accept is what the real metadata server must serve.

Python google-auth + google-cloud-storage, Node gcp-metadata + google-auth-library, Go
compute/metadata + x/oauth2/google + api/idtoken (current, from go.mod, and Debian's packages), and gcloud
where installed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from metaemu.testing.world import PROJECT_ID, PROJECT_NUMBER, SERVICE_ACCOUNT
from tests.clients import harness
from tests.clients.conftest import AUDIENCE, BUCKET, PYTHON_CLIENT, Live


async def test_cl12_python_google_auth_and_storage(live: Live, tmp_path: Path) -> None:
    env = harness.client_env(live.addr, tmp_path)
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(PYTHON_CLIENT), AUDIENCE, live.storage_url, BUCKET],
        env=env, capture_output=True, text=True, timeout=harness.DEFAULT_TIMEOUT)
    out = json.loads(proc.stdout or "{}")
    assert proc.returncode == 0, (out, proc.stderr[-2000:])
    token = live.current_token()
    assert out["adc_type"] == "Credentials"  # google.auth.compute_engine: detected as on GCE (CL-01)
    assert (out["project"], out["email"], out["access_token"]) == (PROJECT_ID, SERVICE_ACCOUNT, token)
    assert out["universe_domain"] == "googleapis.com"  # CL-11
    assert (out["ce_token"], out["ce_email"]) == (token, SERVICE_ACCOUNT)
    live.verify_id_token(out["id_token"], email=True)  # format=full
    live.verify_id_token(out["fetched_id_token"], email=True)
    assert out["storage_project"] == PROJECT_ID
    assert (out["blobs"], out["bucket"]) == (["hello.txt"], BUCKET)
    # The storage stand-in saw a bearer token minted for devstorage scopes via metaemu (SA-09).
    assert live.storage.seen_tokens
    info = live.world.google.token_info(live.storage.seen_tokens[-1])
    assert info is not None
    assert info.email == SERVICE_ACCOUNT
    assert any("devstorage" in s for s in info.scopes)


@pytest.mark.skipif(not harness.node_available(), reason="node or the npm packages are not installed "
                    "(scripts/install-clients.sh)")
async def test_cl12_node_gcp_metadata_and_google_auth_library(live: Live, tmp_path: Path) -> None:
    env = harness.client_env(live.addr, tmp_path)
    out = await asyncio.to_thread(harness.run_node_client, env, AUDIENCE)
    assert out["available"] is True  # CL-02: the un-slashed instance ping through the 301
    assert (out["project"], out["auth_project"], out["email"]) == (PROJECT_ID, PROJECT_ID, SERVICE_ACCOUNT)
    assert out["access_token"] == live.current_token()
    assert out["auth_header"] == f"Bearer {live.current_token()}"
    live.verify_id_token(out["id_token"], email=True)  # raw (unencoded) audience, R-15
    assert out["universe_domain"] == "googleapis.com"


@pytest.mark.parametrize("flavour", ["current", "debian"])
async def test_cl12_go_compute_metadata_oauth2_and_idtoken(live: Live, tmp_path: Path, flavour: str) -> None:
    """Both the current libraries (go.mod) and Debian's (users run both); one source."""
    assert harness.go_available(flavour), f"the Go client ({flavour}) cannot build: run scripts/install-clients.sh"
    binary = await asyncio.to_thread(harness.build_go_client, tmp_path / "go", flavour=flavour)
    env = harness.client_env(live.addr, tmp_path)
    out = await asyncio.to_thread(harness.run_go_client, binary, env, AUDIENCE)
    assert out["available"] is True
    assert (out["project"], out["numeric_project"], out["email"]) == (PROJECT_ID, PROJECT_NUMBER, SERVICE_ACCOUNT)
    assert out["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"]
    token = live.current_token()
    assert (out["access_token"], out["token_type"], out["adc_access_token"]) == (token, "Bearer", token)
    assert out["auth_project"] == PROJECT_ID
    live.verify_id_token(out["metadata_id_token"], email=True)
    if flavour == "current" or out["id_token"] is not None:  # Debian's api/idtoken may not build
        assert out["id_token"] is not None
        live.verify_id_token(out["id_token"], email=True)


@pytest.mark.skipif(not harness.gcloud_available(), reason="gcloud is not installed on this machine "
                    "(not installable from the reachable registries; clients.md §8.1)")
async def test_cl12_gcloud_account_project_token_and_identity(live: Live, tmp_path: Path) -> None:
    env = harness.client_env(live.addr, tmp_path)
    config = await asyncio.to_thread(harness.run_gcloud, env, "config", "list", "--format=json")
    assert config is not None
    core = json.loads(config)["core"]
    assert (core["account"], core["project"]) == (SERVICE_ACCOUNT, PROJECT_ID)
    token = await asyncio.to_thread(harness.run_gcloud, env, "auth", "print-access-token")
    assert token is not None
    assert token.strip() == live.current_token()
    ident = await asyncio.to_thread(harness.run_gcloud, env, "auth", "print-identity-token",
                                    f"--audiences={AUDIENCE}")
    assert ident is not None
    live.verify_id_token(ident.strip(), email=False)  # gcloud asks format=standard
