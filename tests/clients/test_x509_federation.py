"""Real clients against a metaemu configured with gcloud's X.509 credential configuration (issue #14):
metaemu runs ``--credential-config`` with ``credential_source.certificate``, exchanges the workload's
SPIFFE-style certificate over real mTLS at the Google stand-in (which verifies it against the X.509
provider's trust store) and impersonates; python google-auth (``google.auth.default``,
``compute_engine.Credentials``, ID tokens) and google-cloud-storage, pointed at it with
``GCE_METADATA_HOST/IP/ROOT``, get their tokens (``python_client.py``). Loopback only."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from metaemu.clock import SystemClock
from metaemu.config import load_config
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_pki import IssuedCertificate
from metaemu.transport import AiohttpClient
from tests.clients import harness
from tests.clients.conftest import AUDIENCE, BUCKET, PYTHON_CLIENT, storage_stand_in
from tests.credentials.sources.x509_support import (
    SERVICE_ACCOUNT,
    SPIFFE_ID,
    X509World,
    build_x509_world,
    serve_mtls,
)


@pytest.fixture
def world(tmp_path: Path) -> X509World:
    clock = SystemClock()  # google-auth and the client processes live in real time
    return build_x509_world(tmp_path, clock=clock, now=clock.now())


@pytest.fixture
async def storage(world: X509World) -> AsyncIterator[str]:
    async with storage_stand_in(world.google) as (_, url):
        yield url


async def run_python_client(server: MetaemuServer, storage_url: str, tmp_path: Path) -> dict[str, Any]:
    env = harness.client_env(str(server.metadata_address), tmp_path)
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(PYTHON_CLIENT), AUDIENCE, storage_url, BUCKET],
        env=env, capture_output=True, text=True, timeout=harness.DEFAULT_TIMEOUT)
    out: dict[str, Any] = json.loads(proc.stdout or "{}")
    out["returncode"] = proc.returncode
    out["stderr"] = proc.stderr[-2000:]
    return out


async def serve_clients(world: X509World, leaf: IssuedCertificate, *, chain: bool, storage_url: str,
                        tmp_path: Path) -> dict[str, Any]:
    world.write_workload(leaf, chain=leaf.intermediates_pem if chain else None)
    world.allow(SPIFFE_ID)
    (world.directory / "metaemu.yaml").write_text(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nproject_id: demo-project\n")
    async with serve_mtls(world) as base:
        config = load_config(path=world.directory / "metaemu.yaml",
                             credential_config=world.credential_config(token_url=base + "/v1/token", chain=chain),
                             env={})
        http = AiohttpClient(ssl_context=world.client_context(), client_context=world.client_context)
        try:
            async with MetaemuServer(config, http=http) as server:
                return await run_python_client(server, storage_url, tmp_path)
        finally:
            await http.close()


def assert_served_as_the_service_account(out: dict[str, Any], world: X509World) -> None:
    assert out["returncode"] == 0, out
    assert out["adc_type"] == "Credentials"  # google.auth.compute_engine: it believes it is on GCE
    assert (out["email"], out["ce_email"]) == (SERVICE_ACCOUNT, SERVICE_ACCOUNT)
    info = world.google.token_info(out["ce_token"])
    assert info is not None and info.email == SERVICE_ACCOUNT
    assert out["blobs"] == ["hello.txt"]
    exchanges = [r for r in world.google.requests if r.endpoint == "sts"]
    assert exchanges and all(r.form["subject_token_type"] == "urn:ietf:params:oauth:token-type:mtls"
                             and r.headers.get("Client-Cert") for r in exchanges)


async def test_python_clients_get_tokens_from_a_spiffe_svid_federated_over_mtls(
        world: X509World, storage: str, tmp_path: Path) -> None:
    out = await serve_clients(world, world.leaf(), chain=False, storage_url=storage, tmp_path=tmp_path)
    assert_served_as_the_service_account(out, world)


async def test_python_clients_get_tokens_from_a_cert_manager_certificate_with_its_intermediate(
        world: X509World, storage: str, tmp_path: Path) -> None:
    leaf = world.corp.issue("app.corp.example", now=world.now, uri=SPIFFE_ID, dns=("app.corp.example",))
    out = await serve_clients(world, leaf, chain=True, storage_url=storage, tmp_path=tmp_path)
    assert_served_as_the_service_account(out, world)
    (first, *_) = [r for r in world.google.requests if r.endpoint == "sts"]
    assert len(json.loads(first.form["subject_token"])) == 2  # leaf, then the trust chain's intermediate
