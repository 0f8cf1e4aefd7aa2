"""``metaemu doctor --config`` in sidecar mode against the Google stand-ins over loopback, one fault
injected per test: each failure message and fix of issue #14, and exit 0 only when the chain works.
No test contacts 169.254.169.254: the metadata steps always point at a loopback metaemu (UP-12)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.testing.world import (
    AUDIENCE,
    CLUSTER_ISSUER,
    KSA,
    NAMESPACE,
    PROJECT_NUMBER,
    SERVICE_ACCOUNT,
    World,
    build_world,
)
from tests.credentials.support import serve
from tests.doctor.support import Outcome, run_doctor, write_config
from tests.helpers import running_server

OTHER_NUMBER = "999999999999"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def world(tmp_path: Path, clock: FakeClock) -> World:
    return build_world(tmp_path, clock=clock)


@pytest.fixture
async def google_url(world: World) -> AsyncIterator[str]:
    async with serve(world.google.app()) as url:
        yield url


@pytest.fixture
async def metadata_address(world: World, clock: FakeClock) -> AsyncIterator[str]:
    """A real metaemu serving this world on 127.0.0.1:0: where the app-side checks look."""
    async with running_server(world, clock=clock) as server:
        yield server.metadata_url.removeprefix("http://")


async def doctor_of(world: World, tmp_path: Path, google_url: str, clock: FakeClock, metadata: str = "127.0.0.1:9",
                    **overrides: str) -> Outcome:
    config = write_config(world, tmp_path, google_url, overrides=overrides)
    return await run_doctor(["--config", str(config), "--metadata-address", metadata, "--metadata-name", "localhost"],
                            clock=clock)


async def test_a_working_chain_reports_every_step_ok_and_exits_0(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock, metadata_address: str) -> None:
    outcome = await doctor_of(world, tmp_path, google_url, clock, metadata=metadata_address)
    assert outcome.status == 0, outcome.text
    assert outcome.statuses == {"config": "ok", "subject token": "ok", "sts exchange": "ok", "impersonation": "ok",
                                "metadata names": "ok", "metadata server": "ok"}
    subject = outcome.check("subject token")["details"]
    assert subject["issuer"] == CLUSTER_ISSUER
    assert subject["subject"] == f"system:serviceaccount:{NAMESPACE}:{KSA}"
    assert subject["audience"] == AUDIENCE
    assert outcome.check("metadata server")["details"]["email"] == SERVICE_ACCOUNT
    # SECURITY: never token material, in either rendering.
    token = world.token_file.read_text()
    for text in (outcome.text, str(outcome.report)):
        assert token not in text and token.split(".")[2] not in text and "ya29." not in text
    assert "the chain works" in outcome.text


async def test_an_expired_subject_token_stops_the_chain_before_sts(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    world.write_token(lifetime_s=600)
    clock.advance(601)
    outcome = await doctor_of(world, tmp_path, google_url, clock)
    assert outcome.status == 1
    # The file source itself refuses it (as serve would), saying when it expired.
    assert outcome.failed["name"] == "subject token"
    assert "expired at" in outcome.failed["cause"]
    assert outcome.statuses["sts exchange"] == "skip"
    assert world.google.calls["sts"] == 0


async def test_a_missing_token_file_names_the_projection_to_mount(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    world.token_file.unlink()
    outcome = await doctor_of(world, tmp_path, google_url, clock)
    assert outcome.status == 1
    assert outcome.failed["name"] == "subject token"
    assert "serviceAccountToken projection" in outcome.failed["fix"]


async def test_an_audience_the_provider_does_not_allow_is_diagnosed_with_the_token_audience(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    world.token_file.write_text(world.issuer.mint_kubernetes(namespace=NAMESPACE, service_account=KSA,
                                                             audience="https://kubernetes.default.svc"))
    outcome = await doctor_of(world, tmp_path, google_url, clock)
    assert outcome.status == 1
    assert outcome.check("subject token")["status"] == "warn"
    failed = outcome.failed
    assert (failed["name"], failed["diagnosis"]) == ("sts exchange", "sts.audience_mismatch")
    assert failed["upstream"].startswith("sts returned 400: invalid_grant: The audience in ID Token")
    assert "[https://kubernetes.default.svc]" in failed["cause"]
    assert "--allowed-audiences=https://kubernetes.default.svc" in failed["fix"]


async def test_an_issuer_the_provider_does_not_trust_is_diagnosed_with_the_issuer_to_set(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    world.google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer="https://oidc.elsewhere",
                                                       jwks=world.issuer.jwks()))
    outcome = await doctor_of(world, tmp_path, google_url, clock)
    assert outcome.failed["diagnosis"] == "sts.issuer_mismatch"
    assert f"--issuer-uri={CLUSTER_ISSUER}" in outcome.failed["fix"]


async def test_a_provider_without_the_issuers_key_is_told_to_upload_the_jwks(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    stranger = FakeIssuer(issuer=CLUSTER_ISSUER, kid=world.issuer.kid)
    world.google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=CLUSTER_ISSUER,
                                                       jwks=stranger.jwks()))
    outcome = await doctor_of(world, tmp_path, google_url, clock)
    assert outcome.failed["diagnosis"] == "sts.key_mismatch"
    assert "--jwk-json-path=jwks.json" in outcome.failed["fix"]


async def test_an_attribute_condition_rejection_names_the_subject_and_the_condition_to_read(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    world.google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=CLUSTER_ISSUER,
                                                       jwks=world.issuer.jwks(), attribute_condition=lambda _: False))
    outcome = await doctor_of(world, tmp_path, google_url, clock)
    failed = outcome.failed
    assert failed["diagnosis"] == "sts.attribute_condition"
    assert failed["upstream"] == ("sts returned 400: unauthorized_client: The given credential is rejected by the "
                                  "attribute condition.")
    assert f"system:serviceaccount:{NAMESPACE}:{KSA}" in failed["cause"]
    assert "value(attributeCondition)" in failed["fix"]


async def test_an_unknown_provider_is_a_provider_mismatch(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    outcome = await doctor_of(world, tmp_path, google_url, clock, audience=AUDIENCE.replace("demo-provider", "typo"))
    assert outcome.failed["diagnosis"] == "sts.provider_mismatch"
    assert "providers describe typo --workload-identity-pool=demo-pool" in outcome.failed["fix"]


async def test_a_wrong_project_number_in_the_audience_is_named_against_the_configured_one(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    outcome = await doctor_of(world, tmp_path, google_url, clock,
                              audience=AUDIENCE.replace(PROJECT_NUMBER, OTHER_NUMBER))
    failed = outcome.failed
    assert failed["diagnosis"] == "sts.wrong_project_number"
    assert OTHER_NUMBER in failed["cause"] and PROJECT_NUMBER in failed["cause"]
    assert "gcloud projects describe demo-project --format='value(projectNumber)'" in failed["fix"]


async def test_a_project_id_in_the_audience_is_a_wrong_project_number(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    outcome = await doctor_of(world, tmp_path, google_url, clock,
                              audience=AUDIENCE.replace(PROJECT_NUMBER, "demo-project"))
    failed = outcome.failed
    assert failed["diagnosis"] == "sts.wrong_project_number"
    assert failed["upstream"].startswith('sts returned 400: invalid_request: Invalid value for "audience"')


async def test_a_missing_workload_identity_user_grant_gives_the_principal_to_grant(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    world.google.revoke(SERVICE_ACCOUNT, world.principal)
    outcome = await doctor_of(world, tmp_path, google_url, clock)
    failed = outcome.failed
    assert (failed["name"], failed["diagnosis"]) == ("impersonation", "iam.workload_identity_user_missing")
    assert failed["upstream"] == ("iam returned 403: Permission 'iam.serviceAccounts.getAccessToken' denied on "
                                  "resource (or it may not exist).")
    assert failed["fix"] == (f"gcloud iam service-accounts add-iam-policy-binding {SERVICE_ACCOUNT} "
                             f"--role=roles/iam.workloadIdentityUser --member={world.principal}")
    assert outcome.statuses["sts exchange"] == "ok"


async def test_a_disabled_service_account_is_told_to_be_enabled(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    world.google.disable_service_account(SERVICE_ACCOUNT)
    outcome = await doctor_of(world, tmp_path, google_url, clock)
    assert outcome.failed["diagnosis"] == "iam.service_account_disabled"
    assert outcome.failed["fix"] == f"gcloud iam service-accounts enable {SERVICE_ACCOUNT}"


async def test_an_unknown_service_account_is_not_found(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    outcome = await doctor_of(world, tmp_path, google_url, clock,
                              service_account="typo@demo-project.iam.gserviceaccount.com")
    assert outcome.failed["diagnosis"] == "iam.service_account_not_found"


async def test_without_impersonation_the_step_is_skipped_and_the_chain_still_works(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock, metadata_address: str) -> None:
    config = write_config(world, tmp_path, google_url, impersonate=False)
    outcome = await run_doctor(["--config", str(config), "--metadata-address", metadata_address, "--metadata-name",
                                "localhost"], clock=clock)
    assert outcome.statuses["impersonation"] == "skip"
    assert outcome.check("impersonation")["summary"].startswith("no service account configured")
    assert outcome.status == 0, outcome.text  # a skipped step is no broken link


async def test_an_invalid_config_fails_first_naming_the_key(tmp_path: Path, clock: FakeClock) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("mode: sidecar\nprofile: nope\n")
    outcome = await run_doctor(["--config", str(config)], clock=clock)
    assert outcome.status == 1
    assert outcome.report["checks"][0] == {"name": "config", "status": "fail", "details": {},
                                         "summary": "profile: must be 'gce' or 'gke', got 'nope'",
                                         "diagnosis": "config.invalid",
                                         "fix": "correct profile (README, Configuration reference)"}
    assert {c["status"] for c in outcome.report["checks"][1:]} == {"skip"}


async def test_sts_unreachable_is_an_egress_problem(
        world: World, tmp_path: Path, clock: FakeClock, refused_port: int) -> None:
    outcome = await doctor_of(world, tmp_path, f"http://127.0.0.1:{refused_port}", clock)
    assert outcome.failed["diagnosis"] == "sts.unreachable"


async def test_the_metadata_address_must_answer_with_metadata_flavor_google(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    async def plain(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", plain)
    async with serve(app) as impostor:
        outcome = await doctor_of(world, tmp_path, google_url, clock, metadata=impostor.removeprefix("http://"))
    assert outcome.failed["diagnosis"] == "metadata.not_google"


async def test_nothing_at_the_metadata_address_is_unreachable(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock, refused_port: int) -> None:
    outcome = await doctor_of(world, tmp_path, google_url, clock, metadata=f"127.0.0.1:{refused_port}")
    assert outcome.failed["diagnosis"] == "metadata.unreachable"


async def test_names_that_do_not_resolve_to_the_metadata_address_get_the_hosts_fix(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    async def resolver(name: str) -> list[str]:
        if name == "metadata":
            raise OSError(-2, "Name or service not known")
        return ["10.0.0.7"]

    config = write_config(world, tmp_path, google_url)
    outcome = await run_doctor(["--config", str(config)], clock=clock, resolver=resolver)
    failed = outcome.failed
    assert failed["diagnosis"] == "metadata.names"
    assert failed["details"] == {"metadata.google.internal": "10.0.0.7",
                                 "metadata": "does not resolve (Name or service not known)"}
    assert "hostAliases" in failed["fix"]
    assert outcome.statuses["metadata server"] == "skip"  # 169.254.169.254 itself is never contacted


async def test_the_cli_runs_the_doctor_and_its_exit_status_says_whether_the_chain_works(
        tmp_path: Path, refused_port: int) -> None:
    world = build_world(tmp_path)  # real time: a child process
    async with serve(world.google.app()) as url:
        config = write_config(world, tmp_path, url)
        base = [sys.executable, "-m", "metaemu", "doctor", "--config", str(config), "--metadata-address",
                f"127.0.0.1:{refused_port}", "--metadata-name", "localhost"]
        proc = await asyncio.create_subprocess_exec(*base, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 1  # nothing serves the metadata address
        text = out.decode()
        assert "[ok]   sts exchange" in text and "[ok]   impersonation" in text
        assert "[FAIL] metadata server" in text and "the chain is broken" in text


async def test_pod_is_refused_outside_node_mode_as_a_config_failure(
        world: World, tmp_path: Path, google_url: str, clock: FakeClock) -> None:
    config = write_config(world, tmp_path, google_url)
    outcome = await run_doctor(["--config", str(config), "--pod", "apps/web"], clock=clock)
    assert outcome.status == 1
    assert outcome.failed["summary"] == "--pod: only in node mode (mode: node)"
    assert world.google.calls["sts"] == 0


async def test_no_config_at_all_is_a_config_failure(clock: FakeClock) -> None:
    outcome = await run_doctor([], clock=clock)
    assert outcome.failed["summary"] == "--config: required (or METAEMU_CONFIG, or --credential-config)"
