"""The Google STS stand-in for X.509 federation, over real TLS on loopback (issue #14): it takes the
client certificate from the handshake, verifies the subject token's chain against the provider's
trust store as Google documents, and refuses with an RFC 6749 error otherwise."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from metaemu.credentials.sts import GRANT_TYPE
from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, MTLS_TOKEN_TYPE
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.fake_google_sts import SubjectCheck, WorkloadIdentityProvider
from metaemu.testing.fake_google_x509 import X509Federation, verify_mtls_subject
from metaemu.testing.fake_pki import Authority, IssuedCertificate
from metaemu.transport import AiohttpClient, ClientCertificate, HttpRequest, HttpResponse, TransportFailure
from tests.credentials.sources.x509_support import AUDIENCE, SPIFFE_ID, X509World, build_x509_world, serve_mtls


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def world(tmp_path: Path, clock: FakeClock) -> X509World:
    return build_x509_world(tmp_path, clock=clock, now=clock.now())


@pytest.fixture
async def sts(world: X509World) -> AsyncIterator[str]:
    async with serve_mtls(world) as url:
        yield url + "/v1/token"


@pytest.fixture
async def http(world: X509World) -> AsyncIterator[AiohttpClient]:
    client = AiohttpClient(ssl_context=world.client_context(), client_context=world.client_context)
    yield client
    await client.close()


def b64(*certs: IssuedCertificate | Authority) -> str:
    """The subject token google-auth builds: a JSON list of base64 DER certificates, leaf first."""
    return json.dumps([base64.b64encode(c.certificate.public_bytes(serialization.Encoding.DER)).decode()
                       for c in certs])


async def exchange(http: AiohttpClient, url: str, *, subject_token: str, present: IssuedCertificate | None,
                   token_type: str = MTLS_TOKEN_TYPE, audience: str = AUDIENCE,
                   chain_pem: bytes | None = None) -> HttpResponse:
    cert = None if present is None else ClientCertificate(cert_pem=chain_pem or present.cert_pem,
                                                          key_pem=present.key_pem)
    return await http.send(HttpRequest.form(url, {
        "grant_type": GRANT_TYPE, "audience": audience, "scope": "https://www.googleapis.com/auth/cloud-platform",
        "requested_token_type": ACCESS_TOKEN_TYPE, "subject_token": subject_token,
        "subject_token_type": token_type}, client_certificate=cert))


def refusal(response: HttpResponse) -> dict[str, Any]:
    body = response.decoded()
    assert response.status == 400, body
    assert isinstance(body, dict) and set(body) == {"error", "error_description"}
    return body


async def test_a_spiffe_svid_is_exchanged_for_its_uri_san_over_mtls(
        world: X509World, sts: str, http: AiohttpClient) -> None:
    leaf = world.leaf()
    response = await exchange(http, sts, subject_token=b64(leaf), present=leaf)
    assert response.status == 200, response.decoded()
    info = world.google.token_info(response.decoded()["access_token"])
    assert info is not None and info.principal.endswith(f"/subject/{SPIFFE_ID}")


async def test_a_cert_manager_chain_verifies_through_the_intermediate_in_the_subject_token(
        world: X509World, sts: str, http: AiohttpClient) -> None:
    leaf = world.corp.issue("app.corp.example", now=world.now, uri="spiffe://corp.example/app",
                            dns=("app.corp.example",))
    response = await exchange(http, sts, subject_token=b64(leaf, world.corp), present=leaf,
                              chain_pem=leaf.chain_pem)
    assert response.status == 200, response.decoded()


async def test_the_chain_fails_without_the_intermediate_the_trust_store_lacks(
        world: X509World, sts: str, http: AiohttpClient) -> None:
    leaf = world.corp.issue("app.corp.example", now=world.now, uri="spiffe://corp.example/app")
    body = refusal(await exchange(http, sts, subject_token=b64(leaf), present=leaf, chain_pem=leaf.chain_pem))
    assert body["error"] == "invalid_grant" and "trust store" in body["error_description"]


async def test_a_certificate_of_another_providers_ca_is_untrusted_here(
        world: X509World, sts: str, http: AiohttpClient) -> None:
    leaf = world.other.issue("intruder", now=world.now, uri=SPIFFE_ID)
    body = refusal(await exchange(http, sts, subject_token=b64(leaf), present=leaf))
    assert body["error"] == "invalid_grant" and "trust store" in body["error_description"]


async def test_a_certificate_of_an_unregistered_ca_fails_the_handshake(
        world: X509World, sts: str, http: AiohttpClient) -> None:
    leaf = world.stranger.issue("stranger", now=world.now, uri=SPIFFE_ID)
    with pytest.raises(TransportFailure):
        await exchange(http, sts, subject_token=b64(leaf), present=leaf)


async def test_an_expired_leaf_is_refused(world: X509World, sts: str, http: AiohttpClient, clock: FakeClock) -> None:
    leaf = world.leaf()
    clock.advance(2 * 86400)  # the leaf lives a day
    body = refusal(await exchange(http, sts, subject_token=b64(leaf), present=leaf))
    assert body["error"] == "invalid_grant" and "not valid at validation time" in body["error_description"]


async def test_a_subject_token_naming_another_leaf_than_the_client_certificate_is_refused(
        world: X509World, sts: str, http: AiohttpClient) -> None:
    presented, named = world.leaf(rotation=1), world.leaf(rotation=2)
    body = refusal(await exchange(http, sts, subject_token=b64(named), present=presented))
    assert body["error"] == "invalid_grant" and "not the client certificate" in body["error_description"]


async def test_an_exchange_without_a_client_certificate_is_refused(
        world: X509World, sts: str, http: AiohttpClient) -> None:
    body = refusal(await exchange(http, sts, subject_token=b64(world.leaf()), present=None))
    assert body["error"] == "invalid_request" and "mTLS" in body["error_description"]


async def test_a_client_sent_client_cert_header_is_not_believed(
        world: X509World, sts: str, http: AiohttpClient) -> None:
    leaf = world.leaf()
    der = base64.b64encode(leaf.certificate.public_bytes(serialization.Encoding.DER)).decode()
    request = HttpRequest.form(sts, {"grant_type": GRANT_TYPE, "audience": AUDIENCE,
                                     "requested_token_type": ACCESS_TOKEN_TYPE, "subject_token": b64(leaf),
                                     "subject_token_type": MTLS_TOKEN_TYPE}, headers={"Client-Cert": f":{der}:"})
    assert refusal(await http.send(request))["error"] == "invalid_request"  # RFC 9440 §4


@pytest.mark.parametrize("token_type", [JWT_TOKEN_TYPE, "urn:ietf:params:oauth:token-type:x509"])
async def test_a_certificate_chain_under_another_token_type_is_refused(
        world: X509World, sts: str, http: AiohttpClient, token_type: str) -> None:
    leaf = world.leaf()
    body = refusal(await exchange(http, sts, subject_token=b64(leaf), present=leaf, token_type=token_type))
    assert body["error"] in ("invalid_grant", "invalid_request")


async def test_an_mtls_token_for_an_oidc_provider_is_refused(world: X509World, sts: str, http: AiohttpClient) -> None:
    oidc = AUDIENCE.replace("/providers/x509", "/providers/oidc")
    world.google.add_provider(WorkloadIdentityProvider(audience=oidc, issuer="https://issuer.test",
                                                       jwks={"keys": []}))
    leaf = world.leaf()
    body = refusal(await exchange(http, sts, subject_token=b64(leaf), present=leaf, audience=oidc))
    assert body["error"] == "invalid_grant" and "not an X.509 provider" in body["error_description"]


@pytest.mark.parametrize("token", ["not json", "[]", '["not base64!"]', '{"x5c": []}'])
async def test_a_malformed_subject_token_is_an_invalid_request(
        world: X509World, sts: str, http: AiohttpClient, token: str) -> None:
    body = refusal(await exchange(http, sts, subject_token=token, present=world.leaf()))
    assert body["error"] == "invalid_request"


# -- the documented limits, checked without TLS ---------------------------------------------------------

def check_for(world: X509World, leaf: IssuedCertificate, *, token: str | None = None) -> SubjectCheck:
    der = base64.b64encode(leaf.certificate.public_bytes(serialization.Encoding.DER)).decode()
    provider = WorkloadIdentityProvider(audience=AUDIENCE, x509=X509Federation(
        trust_anchors=(world.spiffe.certificate,), subject_attribute="subject.dn.cn"))
    return SubjectCheck(subject_token=token or b64(leaf), subject_token_type=MTLS_TOKEN_TYPE, audience=AUDIENCE,
                        provider=provider, headers={"Client-Cert": f":{der}:"}, now=world.now)


async def test_the_default_mapping_is_the_subject_common_name(world: X509World) -> None:
    assert await verify_mtls_subject(check_for(world, world.leaf(rotation=7))) == "app-7"


async def test_a_leaf_without_client_auth_usage_is_refused(world: X509World) -> None:
    leaf = world.spiffe.issue("server-only", now=world.now, client_auth=False)
    with pytest.raises(Exception, match="EKU"):
        await verify_mtls_subject(check_for(world, leaf))


async def test_a_leaf_issued_for_longer_than_390_days_is_refused(world: X509World) -> None:
    leaf = world.leaf(lifetime=dt.timedelta(days=391))
    with pytest.raises(Exception, match="390 days"):
        await verify_mtls_subject(check_for(world, leaf))


def test_a_trust_store_holds_at_most_three_anchors(world: X509World) -> None:
    anchors = (world.spiffe.certificate, world.corp_root.certificate, world.other.certificate,
               world.stranger.certificate)
    with pytest.raises(Exception, match="trustAnchors"):
        X509Federation(trust_anchors=anchors)


# -- google-auth as the oracle -----------------------------------------------------------------------------

def google_auth_refresh(creds_path: Path, ca_file: Path) -> str:
    """google-auth's own X.509 credentials (identity_pool, requests transport with ``cert=``), blocking."""
    import requests
    from google.auth import identity_pool
    from google.auth.transport.requests import Request

    credentials = identity_pool.Credentials.from_file(  # type: ignore[no-untyped-call]  # google-auth is untyped
        str(creds_path), scopes=["https://www.googleapis.com/auth/cloud-platform"])
    session = requests.Session()
    session.verify = str(ca_file)
    session.trust_env = False
    credentials.refresh(Request(session))
    return str(credentials.token)


async def test_google_auths_own_x509_credentials_are_accepted_and_send_what_metaemu_sends(
        world: X509World, sts: str, http: AiohttpClient) -> None:
    """google-auth 2.63's identity_pool with a certificate source, against the stand-in over mTLS:
    accepted, and its form matches the one metaemu's certificate source sends (UP-01)."""
    from metaemu.credentials.sources import SourceContext, build_source
    from metaemu.credentials.sts import StsClient
    from metaemu.credentials.upstream import UpstreamCaller
    from metaemu.metrics import create_metrics
    from tests.credentials.sources.test_certificate import loaded

    leaf = world.corp.issue("app.corp.example", now=world.now, uri=SPIFFE_ID)
    config_path = world.write_workload(leaf, chain=leaf.intermediates_pem)
    # Absolute: google-auth opens relative paths from its working directory, metaemu from the file's.
    creds = world.credential_config(token_url=sts, impersonate=False, certificate={
        "certificate_config_location": str(config_path), "trust_chain_path": str(world.directory / "chain.pem")})
    ca_file = world.directory / "tls-ca.pem"
    ca_file.write_bytes(world.tls_ca.pem)
    token = await asyncio.to_thread(google_auth_refresh, creds, ca_file)
    assert world.google.token_info(token) is not None

    metrics = create_metrics()
    source = build_source(loaded(creds), SourceContext(clock=world.google.clock, http=http, metrics=metrics,
                                                       audience=AUDIENCE))
    sts_client = StsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="sts"), url=sts,
                           clock=world.google.clock, timeout_s=10)
    await sts_client.exchange(await source.fetch(), audience=AUDIENCE,
                              scopes=["https://www.googleapis.com/auth/cloud-platform"])
    theirs, ours = [r for r in world.google.requests if r.endpoint == "sts"]
    assert dict(ours.form) == dict(theirs.form)
    assert ours.headers["Client-Cert"] == theirs.headers["Client-Cert"]


async def test_in_process_the_leaf_of_a_chain_pem_is_the_presented_certificate(world: X509World) -> None:
    """``InProcessClient`` presents the first certificate of ``cert_pem``, as a TLS client would of
    cert-manager's ``tls.crt`` (leaf, then its intermediate)."""
    leaf = world.corp.issue("app.corp.example", now=world.now, uri="spiffe://corp.example/app")
    client = world.google.client()
    response = await client.send(HttpRequest.form("https://sts.mtls.googleapis.com/v1/token", {
        "grant_type": GRANT_TYPE, "audience": AUDIENCE, "requested_token_type": ACCESS_TOKEN_TYPE,
        "subject_token": b64(leaf, world.corp), "subject_token_type": MTLS_TOKEN_TYPE},
        client_certificate=ClientCertificate(cert_pem=leaf.chain_pem, key_pem=leaf.key_pem)))
    assert response.status == 200, response.decoded()
