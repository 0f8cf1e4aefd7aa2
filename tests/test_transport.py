"""``AiohttpClient``'s per-request client certificate (mTLS, issue #14), against a TLS listener on
loopback that reports the certificate it saw in the handshake."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.fake_pki import IssuedCertificate
from metaemu.testing.inprocess import CLIENT_CERT_HEADER, get_header, handler_app
from metaemu.transport import (
    MAX_CLIENT_CONTEXTS,
    AiohttpClient,
    ClientCertificate,
    HttpRequest,
    HttpResponse,
    TransportFailure,
)
from tests.credentials.sources.x509_support import X509World, build_x509_world, serve_mtls


async def echo_client_cert(request: HttpRequest) -> HttpResponse:
    return HttpResponse(status=200, body=(get_header(request, CLIENT_CERT_HEADER) or "none").encode())


@pytest.fixture
def world(tmp_path: Path) -> X509World:
    clock = FakeClock()
    return build_x509_world(tmp_path, clock=clock, now=clock.now())


@pytest.fixture
async def url(world: X509World) -> AsyncIterator[str]:
    async with serve_mtls(world, handler_app(echo_client_cert)) as base:
        yield base + "/echo"


@pytest.fixture
async def client(world: X509World) -> AsyncIterator[AiohttpClient]:
    http = AiohttpClient(ssl_context=world.client_context(), client_context=world.client_context)
    yield http
    await http.close()


def header_for(cert: IssuedCertificate) -> str:
    return f":{base64.b64encode(cert.certificate.public_bytes(serialization.Encoding.DER)).decode()}:"


def presenting(url: str, cert: IssuedCertificate | None) -> HttpRequest:
    client_cert = None if cert is None else ClientCertificate(cert_pem=cert.cert_pem, key_pem=cert.key_pem)
    return HttpRequest(method="GET", url=url, client_certificate=client_cert)


async def test_a_request_presents_its_client_certificate_and_others_present_none(
        world: X509World, url: str, client: AiohttpClient) -> None:
    leaf = world.leaf()
    assert (await client.send(presenting(url, leaf))).body.decode() == header_for(leaf)
    assert (await client.send(presenting(url, None))).body == b"none"


async def test_each_certificate_gets_its_own_context_and_only_the_recent_ones_are_kept(
        world: X509World, url: str, client: AiohttpClient) -> None:
    leaves = [world.leaf(rotation=i) for i in range(MAX_CLIENT_CONTEXTS + 1)]
    for leaf in [*leaves, leaves[-1]]:  # the last one twice: its context is reused
        assert (await client.send(presenting(url, leaf))).body.decode() == header_for(leaf)
    assert len(client._client_contexts) == MAX_CLIENT_CONTEXTS  # no retired keys piling up
    oldest = ClientCertificate(cert_pem=leaves[0].cert_pem, key_pem=leaves[0].key_pem)
    assert oldest.fingerprint not in client._client_contexts


async def test_an_unusable_client_certificate_is_a_transport_failure_without_the_key(
        world: X509World, url: str, client: AiohttpClient) -> None:
    leaf, other = world.leaf(rotation=1), world.leaf(rotation=2)
    mismatched = ClientCertificate(cert_pem=leaf.cert_pem, key_pem=other.key_pem)
    with pytest.raises(TransportFailure, match="cannot use the client certificate") as err:
        await client.send(HttpRequest(method="GET", url=url, client_certificate=mismatched))
    assert "PRIVATE KEY" not in str(err.value)


def test_a_client_certificate_never_shows_its_key_in_a_repr(world: X509World) -> None:
    leaf = world.leaf()
    cert = ClientCertificate(cert_pem=leaf.cert_pem, key_pem=leaf.key_pem)
    assert "PRIVATE" not in repr(cert) and "BEGIN" not in repr(cert)
    assert "BEGIN" not in repr(HttpRequest(method="POST", url="https://x", client_certificate=cert))
