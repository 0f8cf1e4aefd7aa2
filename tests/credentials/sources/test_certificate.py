"""The ``certificate`` source (X.509 workload identity federation, issue #14): the external_account
configuration as google-auth validates it, the certificate configuration, the subject token it builds,
and rotation — the next exchange is sent over mTLS with the rotated certificate."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from metaemu.config import load_config
from metaemu.credentials.sources import SourceContext, SubjectTokenSource, build_source
from metaemu.credentials.sources.certificate import (
    CertificateSource,
    CertificateSourceConfig,
    default_certificate_config,
)
from metaemu.credentials.tokens import JWT_TOKEN_TYPE, MTLS_TOKEN_TYPE
from metaemu.errors import ConfigError, SourceError, UpstreamError
from metaemu.metrics import create_metrics
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.fake_pki import IssuedCertificate
from metaemu.transport import AiohttpClient
from tests.credentials.sources.x509_support import (
    AUDIENCE,
    SERVICE_ACCOUNT,
    SPIFFE_ID,
    X509World,
    build_x509_world,
    serve_mtls,
)
from tests.credentials.support import build_pipeline
from tests.helpers import SA_PATH, Mds

PREFIX = "workload_identity.credential_config (creds.json) credential_source."


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def world(tmp_path: Path, clock: FakeClock) -> X509World:
    return build_x509_world(tmp_path, clock=clock, now=clock.now())


def der_b64(cert: IssuedCertificate) -> str:
    return base64.b64encode(cert.certificate.public_bytes(serialization.Encoding.DER)).decode()


def loaded(path: Path) -> Any:
    wi = load_config(path=None, credential_config=path, env={"METAEMU_PROJECT_ID": "demo-project"}).workload_identity
    assert wi is not None
    return wi.source


def source_for(world: X509World, clock: FakeClock, **kwargs: Any) -> SubjectTokenSource:
    config = loaded(world.credential_config(token_url="https://sts.mtls.googleapis.com/v1/token", **kwargs))
    return build_source(config, SourceContext(clock=clock, http=AiohttpClient(), metrics=create_metrics(),
                                              audience=AUDIENCE))


# -- configuration ---------------------------------------------------------------------------------------

def test_gclouds_credential_configuration_is_accepted_as_is(world: X509World) -> None:
    config = loaded(world.credential_config(token_url="https://sts.mtls.googleapis.com/v1/token", chain=True))
    assert config == CertificateSourceConfig(certificate_config=world.directory / "certificate_config.json",
                                             trust_chain=world.directory / "chain.pem")
    c = load_config(path=None, credential_config=world.directory / "creds.json", env={})
    assert c.endpoints.sts == "https://sts.mtls.googleapis.com/v1/token"  # the file's token_url, as written
    assert c.workload_identity is not None and c.workload_identity.service_account == SERVICE_ACCOUNT


@pytest.mark.parametrize("flag", [True, "true"])
def test_use_default_certificate_config_leaves_the_location_to_the_environment(
        world: X509World, flag: Any) -> None:
    config = loaded(world.credential_config(token_url="https://sts.mtls.googleapis.com/v1/token",
                                            certificate={"use_default_certificate_config": flag}))
    assert config.certificate_config is None


@pytest.mark.parametrize(("certificate", "key", "message"), [
    ({"use_default_certificate_config": True, "certificate_config_location": "c.json"},
     "certificate.certificate_config_location", "cannot be specified when use_default_certificate_config"),
    ({}, "certificate.use_default_certificate_config", "should be true if no certificate_config_location"),
    ({"use_default_certificate_config": False}, "certificate.use_default_certificate_config", "should be true"),
    ({"use_default_certificate_config": "yes"}, "certificate.use_default_certificate_config", "true or false"),
])
def test_certificate_configuration_errors_name_the_key(world: X509World, certificate: dict[str, Any], key: str,
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        loaded(world.credential_config(token_url="https://sts.mtls.googleapis.com/v1/token",
                                       certificate=certificate))
    assert err.value.key == PREFIX + key


def test_a_certificate_source_must_exchange_the_mtls_token_type(world: X509World) -> None:
    path = world.credential_config(token_url="https://sts.mtls.googleapis.com/v1/token")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "subject_token_type": JWT_TOKEN_TYPE}))
    with pytest.raises(ConfigError, match=MTLS_TOKEN_TYPE):
        loaded(path)


def test_the_mtls_token_type_needs_a_certificate_source(world: X509World) -> None:
    path = world.credential_config(token_url="https://sts.mtls.googleapis.com/v1/token")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "credential_source": {"file": "token"}}))
    with pytest.raises(ConfigError, match=r"needs a credential_source\.certificate"):
        loaded(path)


def test_a_certificate_next_to_a_file_is_ambiguous(world: X509World) -> None:
    path = world.credential_config(token_url="https://sts.mtls.googleapis.com/v1/token")
    data = json.loads(path.read_text())
    data["credential_source"]["file"] = "token"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="mutually exclusive"):
        loaded(path)


@pytest.mark.parametrize(("env", "expected"), [
    ({"GOOGLE_API_CERTIFICATE_CONFIG": "/etc/wif/cfg.json",
      "CLOUDSDK_CONTEXT_AWARE_CERTIFICATE_CONFIG_FILE_PATH": "/x.json"}, "/etc/wif/cfg.json"),
    ({"CLOUDSDK_CONTEXT_AWARE_CERTIFICATE_CONFIG_FILE_PATH": "/x.json", "HOME": "/home/u"}, "/x.json"),
    ({"CLOUDSDK_CONFIG": "/gcloud", "HOME": "/home/u"}, "/gcloud/certificate_config.json"),
    ({"HOME": "/home/u"}, "/home/u/.config/gcloud/certificate_config.json"),
    ({"GOOGLE_API_CERTIFICATE_CONFIG": "~/c.json", "HOME": "/home/u"}, "/home/u/c.json"),
])
def test_the_default_certificate_configuration_is_found_where_google_auth_looks(
        env: dict[str, str], expected: str) -> None:
    assert default_certificate_config(env) == Path(expected)


# -- the subject token -----------------------------------------------------------------------------------

async def test_the_subject_token_is_the_leaf_then_the_trust_chain_as_base64_der(
        world: X509World, clock: FakeClock) -> None:
    leaf = world.corp.issue("app.corp.example", now=world.now, uri="spiffe://corp.example/app")
    world.write_workload(leaf, chain=leaf.cert_pem + leaf.intermediates_pem)  # the leaf on top is dropped
    token = await source_for(world, clock, chain=True).fetch()
    assert token.token_type == MTLS_TOKEN_TYPE
    assert json.loads(token.value) == [der_b64(leaf), der_b64(world.corp.issued)]
    assert token.value == json.dumps([der_b64(leaf), der_b64(world.corp.issued)])  # google-auth's separators
    assert token.expiry == leaf.certificate.not_valid_after_utc
    assert token.client_certificate is not None
    assert token.client_certificate.cert_pem == leaf.cert_pem and token.client_certificate.key_pem == leaf.key_pem
    assert "BEGIN" not in repr(token)


async def test_the_leaf_inside_the_trust_chain_is_refused(world: X509World, clock: FakeClock) -> None:
    leaf = world.corp.issue("app", now=world.now)
    world.write_workload(leaf, chain=leaf.intermediates_pem + leaf.cert_pem)
    with pytest.raises(SourceError, match="leaf certificate must be at the top of the trust chain file"):
        await source_for(world, clock, chain=True).fetch()


async def test_an_expired_certificate_is_refused_before_any_exchange(world: X509World, clock: FakeClock) -> None:
    world.write_workload(world.leaf())
    clock.advance(2 * 86400)
    with pytest.raises(SourceError, match=r"expired at .*renewing"):
        await source_for(world, clock).fetch()


async def test_a_key_that_is_not_the_certificates_is_refused(world: X509World, clock: FakeClock) -> None:
    world.write_workload(world.leaf(rotation=1))
    (world.directory / "workload.key").write_bytes(world.leaf(rotation=2).key_pem)
    with pytest.raises(SourceError, match="does not belong to the certificate"):
        await source_for(world, clock).fetch()


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "is not JSON"),
    ("{}", "invalid format"),
    ('{"cert_configs": {"workload": {"cert_path": "a"}}}', "missing \"cert_path\" or \"key_path\""),
])
async def test_a_malformed_certificate_configuration_is_a_source_error(
        world: X509World, clock: FakeClock, content: str, message: str) -> None:
    source = source_for(world, clock)
    (world.directory / "certificate_config.json").write_text(content)
    with pytest.raises(SourceError, match=message):
        await source.fetch()


async def test_a_missing_certificate_configuration_names_the_file(world: X509World, clock: FakeClock) -> None:
    with pytest.raises(SourceError, match=r"certificate_config\.json does not exist"):
        await source_for(world, clock).fetch()


async def test_the_default_location_is_read_from_the_environment_when_built(
        world: X509World, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = world.leaf()
    path = world.write_workload(leaf)
    monkeypatch.setenv("GOOGLE_API_CERTIFICATE_CONFIG", str(path))
    source = source_for(world, clock, certificate={"use_default_certificate_config": True})
    assert isinstance(source, CertificateSource) and source.certificate_config == path
    assert json.loads((await source.fetch()).value) == [der_b64(leaf)]


# -- rotation, over real mTLS ----------------------------------------------------------------------------

@pytest.fixture
async def sts(world: X509World) -> AsyncIterator[str]:
    async with serve_mtls(world) as url:
        yield url + "/v1/token"


async def test_a_rotated_certificate_is_used_for_the_next_exchange(
        world: X509World, clock: FakeClock, sts: str) -> None:
    """cert-manager / a SPIFFE helper rewrites the files in place; the next exchange presents the new
    leaf in the handshake and names it in the subject token, without a restart or a sleep."""
    world.allow(SPIFFE_ID)
    first = world.leaf(rotation=1)
    world.write_workload(first)
    http = AiohttpClient(client_context=world.client_context)
    metrics = create_metrics()
    config = loaded(world.credential_config(token_url=sts, impersonate=False))
    source = build_source(config, SourceContext(clock=clock, http=http, metrics=metrics, audience=AUDIENCE))
    pipeline = build_pipeline(http=http, clock=clock, metrics=metrics, source=source, service_account=None,
                              audience=AUDIENCE,
                              sts_url=sts)
    try:
        await pipeline.federated_token()
        clock.advance(20 * 3600)  # two thirds into the day-long leaf, when a renewer replaces it
        world.now = clock.now()
        second = world.leaf(rotation=2)
        world.write_workload(second)
        await pipeline.federated_token()
        clock.advance(6 * 3600)  # the first leaf has expired now; only the second could succeed
        await pipeline.federated_token()
    finally:
        await http.close()
    presented = [r.headers["Client-Cert"] for r in world.google.requests if r.endpoint == "sts"]
    assert presented == [f":{der_b64(first)}:", f":{der_b64(second)}:", f":{der_b64(second)}:"]
    subjects = [json.loads(r.form["subject_token"])[0] for r in world.google.requests if r.endpoint == "sts"]
    assert subjects == [der_b64(first), der_b64(second), der_b64(second)]


async def test_an_exchange_without_the_stand_ins_trust_is_an_upstream_error(
        world: X509World, clock: FakeClock, sts: str) -> None:
    leaf = world.other.issue("not-here", now=world.now, uri=SPIFFE_ID)
    world.write_workload(leaf)
    http = AiohttpClient(client_context=world.client_context)
    metrics = create_metrics()
    source = build_source(loaded(world.credential_config(token_url=sts, impersonate=False)),
                          SourceContext(clock=clock, http=http, metrics=metrics, audience=AUDIENCE))
    pipeline = build_pipeline(http=http, clock=clock, metrics=metrics, source=source, service_account=None,
                              audience=AUDIENCE,
                              sts_url=sts)
    try:
        with pytest.raises(UpstreamError) as err:
            await pipeline.federated_token()
    finally:
        await http.close()
    assert err.value.status == 400 and err.value.error_code == "invalid_grant" and err.value.permanent


# -- the README's files ------------------------------------------------------------------------------------

def readme_json(marker: str) -> Any:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    (block,) = re.findall(rf"<!-- {marker} -->\n```json\n(.*?)```", readme, flags=re.S)
    return json.loads(block)


async def test_the_readmes_x509_files_are_accepted_and_produce_a_subject_token(
        world: X509World, clock: FakeClock) -> None:
    leaf = world.corp.issue("app.corp.example", now=world.now, uri=SPIFFE_ID)
    world.write_workload(leaf, chain=leaf.intermediates_pem)
    certificate_config = readme_json("x509-certificate-config")
    assert set(certificate_config["cert_configs"]["workload"]) == {"cert_path", "key_path"}
    (world.directory / "creds.json").write_text(json.dumps(readme_json("x509-credential-config")))
    config = loaded(world.directory / "creds.json")
    assert config == CertificateSourceConfig(certificate_config=world.directory / "certificate_config.json",
                                             trust_chain=world.directory / "chain.pem")
    source = build_source(config, SourceContext(clock=clock, http=AiohttpClient(), metrics=create_metrics(),
                                                audience=AUDIENCE))
    assert json.loads((await source.fetch()).value) == [der_b64(leaf), der_b64(world.corp.issued)]


async def test_a_running_metaemu_serves_a_token_from_the_rotated_certificate_once_the_old_one_expired(
        world: X509World, clock: FakeClock, sts: str) -> None:
    """The whole server on a FakeClock: the token from the first leaf, then, the files rotated and the
    clock moved past that token's and that leaf's expiry, a token exchanged with the second leaf."""
    world.allow(SPIFFE_ID)
    first = world.leaf(rotation=1)
    world.write_workload(first)
    (world.directory / "metaemu.yaml").write_text(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nproject_id: demo-project\n")
    config = load_config(path=world.directory / "metaemu.yaml", credential_config=world.credential_config(
        token_url=sts), env={})
    http = AiohttpClient(ssl_context=world.client_context(), client_context=world.client_context)
    try:
        async with MetaemuServer(config, clock=clock, http=http) as server, asyncio.timeout(60):
            mds = Mds(server.metadata_url)
            try:
                before = await mds.get(SA_PATH + "token")
                assert before.status == 200, before.text
                clock.advance(25 * 3600)  # past the hour-long tokens and the day-long first leaf
                world.now = clock.now()
                second = world.leaf(rotation=2)
                world.write_workload(second)
                after = await mds.get(SA_PATH + "token")
                assert after.status == 200, after.text
            finally:
                await mds.close()
    finally:
        await http.close()
    tokens = [json.loads(r.body)["access_token"] for r in (before, after)]
    assert tokens[0] != tokens[1]
    info = world.google.token_info(tokens[1])
    assert info is not None and info.email == SERVICE_ACCOUNT
    presented = [r.headers["Client-Cert"] for r in world.google.requests if r.endpoint == "sts"]
    assert presented[0] == f":{der_b64(first)}:" and presented[-1] == f":{der_b64(second)}:"
