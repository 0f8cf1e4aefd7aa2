"""A running metaemu with an AWS identity: IRSA through moto, or Google's ``aws1`` ``creds.json``
through an IMDSv2 stand-in, exchanged at the fake Google STS (which verifies the SigV4 signature)
and impersonated, served to a metadata client. Faults — AWS STS down, a bad or expired signature, a
denial — answer with the exact status, body and metrics (issue #3 "Done when"; UP-08..UP-12)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from metaemu.clock import Clock, SystemClock
from metaemu.config import parse_config
from metaemu.credentials.tokens import AWS_TOKEN_TYPE
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_aws import SIGNATURE_MISMATCH, AwsKey, AwsRequestVerifier, FakeImds, install
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.inprocess import InProcessClient
from metaemu.testing.world import SERVICE_ACCOUNT, World, build_world
from metaemu.transport import HttpClient, HttpRequest, HttpResponse
from tests.credentials.sources.conftest import ConnectionLog
from tests.credentials.sources.test_aws_imds import CREDS_JSON
from tests.helpers import SA_PATH, Mds, sample

pytestmark = pytest.mark.usefixtures("aws_env", "network")
TOKEN = SA_PATH + "token"
AWS_AUDIENCE = str(CREDS_JSON["audience"])
IRSA_ROLE = "arn:aws:iam::123456789012:role/irsa-role"
IRSA_ARN = "arn:aws:sts::123456789012:assumed-role/irsa-role/demo-app"
STATIC = AwsKey(access_key_id="AKIASTATIC", secret_access_key="the/real/secret",
                arn="arn:aws:iam::123456789012:user/ci")
NODE = AwsKey(access_key_id="ASIANODE", secret_access_key="node/secret", session_token="node-session",
              arn="arn:aws:sts::123456789012:assumed-role/eks-node-role/i-0123456789abcdef0")


@dataclass
class AwsWorld:
    """The shared stand-in world (real time: botocore and moto use it) plus an AWS provider."""

    world: World
    verifier: AwsRequestVerifier
    directory: Path

    def allow(self, arn: str) -> None:
        """Grant the AWS principal ``arn`` the right to impersonate the service account."""
        google = self.world.google
        google.grant(SERVICE_ACCOUNT, google.principal_for(AWS_AUDIENCE, arn))


@pytest.fixture
def aws(tmp_path: Path) -> AwsWorld:
    world = build_world(tmp_path)
    world.google.add_provider(WorkloadIdentityProvider(audience=AWS_AUDIENCE))
    verifier = install(world.google)
    verifier.keys.add(STATIC)
    verifier.keys.add(NODE)
    return AwsWorld(world=world, verifier=verifier, directory=tmp_path)


@contextlib.asynccontextmanager
async def metaemu(aws: AwsWorld, workload_identity: dict[str, Any], *, http: HttpClient | None = None,
                  clock: Clock | None = None) -> AsyncIterator[tuple[MetaemuServer, Mds]]:
    """metaemu on 127.0.0.1:0 with ``workload_identity``; Google is the in-process stand-in."""
    raw = aws.world.config(sts_url="http://sts.googleapis.test/v1/token", iam_url="http://iamcredentials.test/v1")
    raw["workload_identity"] = workload_identity
    if "credential_config" in workload_identity:
        del raw["endpoints"]  # the credential configuration names them
    config = parse_config(raw, hostname="node-1", base_dir=aws.directory)
    server = MetaemuServer(config, clock=clock, http=http or aws.world.google.client())
    async with server:
        mds = Mds(server.metadata_url)
        try:
            yield server, mds
        finally:
            await mds.close()


def irsa(aws: AwsWorld, sts_endpoint: str) -> dict[str, Any]:
    (aws.directory / "aws-token").write_text("projected-web-identity-jwt")
    return {"audience": AWS_AUDIENCE, "service_account": SERVICE_ACCOUNT,
            "source": {"type": "aws", "role_arn": IRSA_ROLE, "web_identity_token_file": "aws-token",
                       "role_session_name": "demo-app", "region": "eu-west-1", "sts_endpoint": sts_endpoint}}


def static_keys(monkeypatch: pytest.MonkeyPatch, aws: AwsWorld) -> dict[str, Any]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", STATIC.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", STATIC.secret_access_key)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    return {"audience": AWS_AUDIENCE, "service_account": SERVICE_ACCOUNT, "source": {"type": "aws"}}


def metric(server: MetaemuServer, name: str, **labels: str) -> float:
    return sample(server.metrics, name, **labels)


# -- success -----------------------------------------------------------------------------------------

async def test_irsa_token_served_end_to_end_through_moto_and_google(
        aws: AwsWorld, moto_url: str, network: ConnectionLog) -> None:
    aws.allow(IRSA_ARN)
    async with metaemu(aws, irsa(aws, moto_url)) as (_, mds):
        reply = await mds.get(TOKEN)
        assert reply.status == 200, reply.text
        body = json.loads(reply.body)
        info = aws.world.google.token_info(body["access_token"])
        assert info is not None and info.email == SERVICE_ACCOUNT
        assert body["token_type"] == "Bearer" and 3500 < body["expires_in"] <= 3600
    (exchange,) = [r for r in aws.world.google.requests if r.endpoint == "sts"]
    assert exchange.form["subject_token_type"] == AWS_TOKEN_TYPE
    assert exchange.form["audience"] == AWS_AUDIENCE
    (verified,) = aws.verifier.verified
    assert verified.arn == IRSA_ARN and verified.target_resource_signed
    assert network.connected and network.refused == []  # UP-12: moto and metaemu on loopback only


async def test_without_impersonation_the_federated_aws_principal_is_served(
        aws: AwsWorld, moto_url: str) -> None:
    wi = irsa(aws, moto_url)
    del wi["service_account"]
    async with metaemu(aws, wi) as (_, mds):
        reply = await mds.get(TOKEN)
        assert reply.status == 200, reply.text
    info = aws.world.google.token_info(json.loads(reply.body)["access_token"])
    assert info is not None and info.kind == "federated"
    assert info.principal == aws.world.google.principal_for(AWS_AUDIENCE, IRSA_ARN)


async def test_googles_creds_json_works_unchanged_against_imdsv2(aws: AwsWorld) -> None:
    """Every URL stays as Google wrote it (169.254.169.254, sts.googleapis.com, iamcredentials…): the
    HTTP client routes IMDS to the stand-in and the rest to the fake Google, all in process."""
    (aws.directory / "creds.json").write_text(json.dumps(CREDS_JSON))
    imds = FakeImds(role_name="eks-node-role", credentials=NODE, availability_zone="us-east-2b")
    google = aws.world.google

    async def route(request: HttpRequest) -> HttpResponse:
        host = urlsplit(request.url).hostname
        return await (imds.handle if host == "169.254.169.254" else google.handle)(request)

    aws.allow(NODE.arn)
    async with metaemu(aws, {"credential_config": "creds.json"}, http=InProcessClient(route)) as (_, mds):
        reply = await mds.get(TOKEN)
        assert reply.status == 200, reply.text
    assert [urlsplit(r.url).path for r in imds.requests][:2] == ["/latest/api/token",
                                                                 "/latest/meta-data/placement/availability-zone"]
    (verified,) = aws.verifier.verified
    assert (verified.arn, verified.region) == (NODE.arn, "us-east-2")


# -- faults ------------------------------------------------------------------------------------------

async def test_aws_sts_down_is_503_naming_aws_sts(aws: AwsWorld, refused_port: int) -> None:
    down = f"http://127.0.0.1:{refused_port}"
    async with metaemu(aws, irsa(aws, down)) as (server, mds):
        reply = await mds.get(TOKEN)
        assert reply.status == 503
        assert reply.headers["Retry-After"] == "2"
        assert reply.text.startswith(f"Unable to generate access token right now; AWS credentials from AWS STS at "
                                     f"{down} failed: EndpointConnectionError: Could not connect to the endpoint URL")
        assert reply.text.endswith("Retry shortly.\n")
        assert metric(server, "metaemu_refresh_total", kind="access_token", result="error") >= 1
        assert metric(server, "metaemu_upstream_errors_total", backend="aws_sts", status="0") >= 1
    assert aws.world.google.calls["sts"] == 0


async def test_a_bad_signature_is_403_invalid_grant_from_google(
        aws: AwsWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    wi = static_keys(monkeypatch, aws)
    aws.verifier.keys.add(AwsKey(access_key_id=STATIC.access_key_id, secret_access_key="what-aws-really-has",
                                 arn=STATIC.arn))
    async with metaemu(aws, wi) as (server, mds):
        reply = await mds.get(TOKEN)
        assert reply.status == 403
        assert reply.text.startswith(f"Unable to generate access token; sts returned 400: invalid_grant: "
                                     f"{SIGNATURE_MISMATCH}")
        assert metric(server, "metaemu_upstream_errors_total", backend="sts", status="400") >= 1
        assert metric(server, "metaemu_refresh_total", kind="access_token", result="error") >= 1
    assert STATIC.secret_access_key not in reply.text


class LaggingClock(SystemClock):
    """A node whose clock is 20 minutes behind AWS and Google: its signatures arrive expired."""

    LAG = dt.timedelta(minutes=20)

    def now(self) -> dt.datetime:
        return super().now() - self.LAG

    def time(self) -> float:
        return super().time() - self.LAG.total_seconds()


async def test_an_expired_signature_is_403_invalid_grant_from_google(
        aws: AwsWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    aws.allow(STATIC.arn)
    async with metaemu(aws, static_keys(monkeypatch, aws), clock=LaggingClock()) as (server, mds):
        reply = await mds.get(TOKEN)
        assert reply.status == 403
        assert reply.text.startswith("Unable to generate access token; sts returned 400: invalid_grant: Signature "
                                     "expired: x-amz-date ")
        assert metric(server, "metaemu_upstream_errors_total", backend="sts", status="400") >= 1
        assert metric(server, "metaemu_refresh_total", kind="access_token", result="error") >= 1


async def test_an_aws_principal_without_a_grant_is_denied_403(
        aws: AwsWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    async with metaemu(aws, static_keys(monkeypatch, aws)) as (server, mds):
        reply = await mds.get(TOKEN)
        assert reply.status == 403
        assert reply.text.startswith("Unable to generate access token; iam returned 403: ")
        assert "roles/iam.workloadIdentityUser" in reply.text
        assert metric(server, "metaemu_upstream_errors_total", backend="iam", status="403") >= 1
        assert metric(server, "metaemu_refresh_total", kind="access_token", result="error") >= 1
    assert aws.verifier.verified[-1].arn == STATIC.arn  # Google accepted the AWS identity; IAM said no
