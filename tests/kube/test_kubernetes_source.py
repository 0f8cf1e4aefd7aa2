"""Sidecar mode's ``kubernetes`` source with a projected service-account token the real API server
issued (issue #10): the token file a kubelet would write (a TokenRequest for the Workload Identity
audience, bound to the pod), exchanged at STS, which verifies it against the real server's JWKS and
issuer, then impersonated; a real client (Python google-auth) gets the result from metaemu.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metaemu.config import parse_config
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.world import AUDIENCE, PROJECT_ID, PROJECT_NUMBER, SERVICE_ACCOUNT
from metaemu.transport import HttpRequest
from tests.clients import harness
from tests.helpers import FLAVOR, SA_PATH, Mds
from tests.kube.agent import unique
from tests.kube.cluster import ISSUER, KubeCluster

pytestmark = pytest.mark.kube

CHECK = """
import google.auth, google.auth.transport.requests
creds, project = google.auth.default()
creds.refresh(google.auth.transport.requests.Request())
print(creds.token, project, creds.service_account_email)
"""


def projected_token(cluster: KubeCluster, namespace: str) -> tuple[str, str]:
    """What kubelet writes into a projected serviceAccountToken volume of pod ``app`` (audience =
    the provider, bound to the pod); returns the token and the pod's UID."""
    cluster.service_account(namespace, "app")
    node = unique("node")
    cluster.node(node)
    uid = cluster.pod(namespace, "app", node=node, service_account="app", ip="169.254.31.1", host_ip="169.254.29.1")
    reply = cluster.token_request(namespace, "app", {
        "audiences": [AUDIENCE], "expirationSeconds": 3600,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "app", "uid": uid}})
    assert reply.status == 201, reply.body
    return str(reply.body["status"]["token"]), uid


async def test_kubernetes_source_exchanges_a_real_projected_token(cluster: KubeCluster, tmp_path: Path) -> None:
    namespace = unique("apps")
    token, uid = projected_token(cluster, namespace)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    google = FakeGoogle()
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=cluster.jwks()))
    google.add_service_account(SERVICE_ACCOUNT)
    google.grant(SERVICE_ACCOUNT, google.principal_for(AUDIENCE, f"system:serviceaccount:{namespace}:app"))
    config = parse_config({
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "profile": "gke", "project_id": PROJECT_ID,
        "numeric_project_id": PROJECT_NUMBER,
        "workload_identity": {"audience": AUDIENCE, "service_account": SERVICE_ACCOUNT,
                              "source": {"type": "kubernetes", "token_file": str(token_file)}},
        "endpoints": {"sts": "http://sts.test/v1/token", "iam_credentials": "http://iam.test/v1"},
    }, hostname="app", base_dir=tmp_path)
    async with MetaemuServer(config, http=google.client()) as server:
        mds = Mds(f"http://{server.metadata_address}")
        try:
            reply = await mds.get(SA_PATH + "token", headers=FLAVOR)
        finally:
            await mds.close()
        assert reply.status == 200, reply.text
        access = json.loads(reply.body)["access_token"]
        info = google.token_info(access)
        assert info is not None and info.email == SERVICE_ACCOUNT
        # STS saw exactly the file's token, signed by the real server's key.
        (subject,) = {r.form["subject_token"] for r in google.requests if r.endpoint == "sts"}
        assert subject == token
        key = next(k for k in jwt.PyJWKSet.from_dict(cluster.jwks()).keys
                   if k.key_id == jwt.get_unverified_header(token)["kid"])
        claims = jwt.decode(subject, key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)
        assert claims["kubernetes.io"]["pod"]["uid"] == uid

        env = harness.client_env(str(server.metadata_address), tmp_path)
        proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", CHECK], env=env, capture_output=True,
                                       text=True, timeout=harness.DEFAULT_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == [access, PROJECT_ID, SERVICE_ACCOUNT]


async def test_a_token_the_real_server_did_not_issue_is_refused_by_sts(cluster: KubeCluster, tmp_path: Path) -> None:
    """The stand-in STS is not a rubber stamp: the same claims signed by another key fail."""
    token, _ = projected_token(cluster, unique("apps"))
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                        headers={"kid": jwt.get_unverified_header(token)["kid"]})
    google = FakeGoogle()
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=cluster.jwks()))
    response = await google.client().send(HttpRequest.form("http://sts.test/v1/token", {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "audience": AUDIENCE,
        "scope": "https://www.googleapis.com/auth/cloud-platform",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "subject_token": forged, "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}))
    assert response.status == 400
    assert response.decoded()["error"] == "invalid_grant"
