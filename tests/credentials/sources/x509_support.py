"""A world for X.509 workload identity federation tests (issue #14): a test PKI, the Google stand-in
with an X.509 provider whose trust store holds it, the workload's files as gcloud and cert-manager lay
them out, and the stand-in served over real TLS on loopback asking for a client certificate.

The PKI, as the two kinds of user the issue names hold it:

- ``spiffe``: a root trust anchor issuing SVID-style leaves with one URI SAN (the provider maps
  ``google.subject`` to ``san.uri``);
- ``corp``: a cert-manager-style root -> intermediate -> leaf, the intermediate sent in the trust
  chain file (``tls.crt`` holds leaf and intermediate);
- ``other``: a second provider's root, trusted by the listener but not by the first provider;
- ``stranger``: a CA nobody registered.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from metaemu.clock import Clock
from metaemu.credentials.tokens import MTLS_TOKEN_TYPE
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.fake_google_x509 import X509Federation, mtls_server_context
from metaemu.testing.fake_pki import Authority, IssuedCertificate

PROJECT_NUMBER = "123456789012"
POOL = f"projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/x509-pool"
AUDIENCE = f"//iam.googleapis.com/{POOL}/providers/x509"
OTHER_AUDIENCE = f"//iam.googleapis.com/{POOL}/providers/other"
SPIFFE_ID = "spiffe://example.org/ns/default/sa/app"
SERVICE_ACCOUNT = "x509-app@demo-project.iam.gserviceaccount.com"


@dataclass(slots=True, kw_only=True)
class X509World:
    directory: Path
    now: dt.datetime
    spiffe: Authority
    corp_root: Authority
    corp: Authority  # the intermediate
    other: Authority
    stranger: Authority
    google: FakeGoogle
    tls_ca: Authority
    server: IssuedCertificate

    def leaf(self, *, rotation: int = 0, lifetime: dt.timedelta = dt.timedelta(days=1)) -> IssuedCertificate:
        """An SVID for ``SPIFFE_ID`` (``rotation`` only makes the certificate differ)."""
        return self.spiffe.issue(f"app-{rotation}", now=self.now, uri=SPIFFE_ID, lifetime=lifetime)

    def write_workload(self, leaf: IssuedCertificate, *, chain: bytes | None = None) -> Path:
        """The leaf, its key, the certificate configuration and (if any) the trust chain file, as
        ``gcloud iam workload-identity-pools create-cred-config`` lays them out; returns the
        certificate configuration's path."""
        leaf.write(self.directory, "workload")
        if chain is not None:
            (self.directory / "chain.pem").write_bytes(chain)
        path = self.directory / "certificate_config.json"
        path.write_text(json.dumps({"cert_configs": {"workload": {
            "cert_path": str(self.directory / "workload.pem"), "key_path": str(self.directory / "workload.key")}}}))
        return path

    def credential_config(self, *, token_url: str, chain: bool = False, impersonate: bool = True,
                          certificate: dict[str, Any] | None = None) -> Path:
        """The external_account file gcloud writes for X.509 federation."""
        source: dict[str, Any] = ({"certificate_config_location": "certificate_config.json"} if certificate is None
                                  else certificate)
        if chain:
            source["trust_chain_path"] = "chain.pem"
        data: dict[str, Any] = {
            "universe_domain": "googleapis.com", "type": "external_account", "audience": AUDIENCE,
            "subject_token_type": MTLS_TOKEN_TYPE, "token_url": token_url,
            "credential_source": {"certificate": source},
            "token_info_url": token_url.replace("/v1/token", "/v1/introspect"),
        }
        if impersonate:
            data["service_account_impersonation_url"] = (
                f"{token_url.split('/v1/token')[0]}/v1/projects/-/serviceAccounts/{SERVICE_ACCOUNT}:generateAccessToken")
        path = self.directory / "creds.json"
        path.write_text(json.dumps(data))
        return path

    def client_context(self) -> ssl.SSLContext:
        """What metaemu's transport trusts the stand-in's listener with (its TLS server CA)."""
        return ssl.create_default_context(cadata=self.tls_ca.pem.decode())

    def allow(self, subject: str) -> None:
        self.google.grant(SERVICE_ACCOUNT, self.google.principal_for(AUDIENCE, subject))


def build_x509_world(directory: Path, *, clock: Clock, now: dt.datetime) -> X509World:
    spiffe = Authority.root("SPIFFE trust domain example.org", now=now)
    corp_root = Authority.root("Corp Root CA", now=now)
    corp = corp_root.intermediate("Corp Issuing CA (cert-manager)", now=now)
    other = Authority.root("Other pool CA", now=now)
    stranger = Authority.root("Unregistered CA", now=now)
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, x509=X509Federation(
        trust_anchors=(spiffe.certificate, corp_root.certificate), subject_attribute="san.uri")))
    google.add_provider(WorkloadIdentityProvider(audience=OTHER_AUDIENCE, x509=X509Federation(
        trust_anchors=(other.certificate,))))
    google.add_service_account(SERVICE_ACCOUNT)
    tls_ca = Authority.root("Stand-in TLS CA", now=now, client_auth=False)
    return X509World(directory=directory, now=now, spiffe=spiffe, corp_root=corp_root, corp=corp, other=other,
                     stranger=stranger, google=google, tls_ca=tls_ca, server=tls_ca.server(now=now))


@contextlib.asynccontextmanager
async def serve_mtls(world: X509World, app: web.Application | None = None) -> AsyncIterator[str]:
    """The stand-in (or ``app``) over TLS on 127.0.0.1:0 asking for a client certificate from any
    registered provider's CA; yields the base URL (``https://127.0.0.1:PORT``)."""
    cert_file, key_file = world.server.write(world.directory, "sts-server")
    context = mtls_server_context(cert_file=cert_file, key_file=key_file, client_cas=(
        world.spiffe.certificate, world.corp_root.certificate, world.corp.certificate, world.other.certificate))
    runner = web.AppRunner(app or world.google.app())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"https://{host}:{port}"
    finally:
        await runner.cleanup()
