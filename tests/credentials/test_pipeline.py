"""Pipeline (source -> STS -> optional impersonation) and the CachedCredentials built over it:
scope rules, the subject token re-read per exchange, and single-flight under a burst of requests
(upstream.md §1.4, §9; UP-02, UP-16, UP-19)."""

from __future__ import annotations

import asyncio

import jwt
import pytest

from metaemu.cache.credentials import CachedCredentials, IdTokenKey
from metaemu.credentials.pipeline import IAM_SCOPE, Pipeline
from metaemu.credentials.sources import SubjectTokenSource
from metaemu.credentials.sources.file import FileSource
from metaemu.errors import NotConfiguredError
from metaemu.metrics import Metrics
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.world import SERVICE_ACCOUNT, World
from tests.credentials.support import CLOUD_SCOPE, STORAGE_SCOPE, MemorySource, build_credentials, build_pipeline

BURST = 100
#: How long a request may wait for a cold exchange; virtual time, never reached here.
WAIT_S = 30.0


def pipeline_for(world: World, clock: FakeClock, metrics: Metrics, source: SubjectTokenSource, *, impersonate: bool,
                 scopes: tuple[str, ...] = (CLOUD_SCOPE,)) -> Pipeline:
    return build_pipeline(http=world.google.client(), clock=clock, metrics=metrics, source=source,
                          service_account=SERVICE_ACCOUNT if impersonate else None, scopes=scopes)


# -- UP-02: scopes -------------------------------------------------------------------------------


async def test_with_impersonation_sts_scope_is_iam_only_and_caller_scopes_go_to_generate_access_token_up02(
        world: World, clock: FakeClock, metrics: Metrics, source: FileSource) -> None:
    pipeline = pipeline_for(world, clock, metrics, source, impersonate=True, scopes=(CLOUD_SCOPE, STORAGE_SCOPE))
    federated = await pipeline.federated_token()
    token = await pipeline.access_token([STORAGE_SCOPE], federated=federated)
    sts, iam = world.google.requests
    assert sts.form["scope"] == IAM_SCOPE == "https://www.googleapis.com/auth/iam"
    assert iam.endpoint == "generateAccessToken"
    assert iam.json["scope"] == [STORAGE_SCOPE]
    info = world.google.token_info(token.value)
    assert info is not None
    assert (info.kind, info.email, info.scopes) == ("service_account", SERVICE_ACCOUNT, (STORAGE_SCOPE,))


async def test_with_impersonation_no_requested_scopes_means_the_configured_scopes_up02(
        world: World, clock: FakeClock, metrics: Metrics, source: FileSource) -> None:
    pipeline = pipeline_for(world, clock, metrics, source, impersonate=True, scopes=(CLOUD_SCOPE, STORAGE_SCOPE))
    await pipeline.access_token([], federated=await pipeline.federated_token())
    assert world.google.requests[-1].json["scope"] == [CLOUD_SCOPE, STORAGE_SCOPE]


async def test_without_impersonation_sts_scope_is_the_configured_scopes_and_the_federated_token_is_served_up02(
        world: World, clock: FakeClock, metrics: Metrics, source: FileSource) -> None:
    pipeline = pipeline_for(world, clock, metrics, source, impersonate=False, scopes=(CLOUD_SCOPE, STORAGE_SCOPE))
    federated = await pipeline.federated_token()
    token = await pipeline.access_token([STORAGE_SCOPE], federated=federated)
    (sts,) = world.google.requests  # no IAM call
    assert sts.form["scope"] == f"{CLOUD_SCOPE} {STORAGE_SCOPE}"
    assert (token.value, token.expiry) == (federated.value, federated.expiry)
    info = world.google.token_info(token.value)
    assert info is not None
    assert (info.kind, info.scopes) == ("federated", (CLOUD_SCOPE, STORAGE_SCOPE))


async def test_id_token_without_a_service_account_is_not_configured_and_calls_nothing(
        world: World, clock: FakeClock, metrics: Metrics, source: FileSource) -> None:
    pipeline = pipeline_for(world, clock, metrics, source, impersonate=False)
    federated = await pipeline.federated_token()
    with pytest.raises(NotConfiguredError) as caught:
        await pipeline.id_token("https://svc.example", include_email=True, federated=federated)
    assert caught.value.permanent is True
    assert "workload_identity.service_account" in caught.value.reason
    assert world.google.calls == {"sts": 1}


# -- UP-16: the projected token file -------------------------------------------------------------


async def test_token_file_is_re_read_for_every_exchange_so_sts_sees_the_rotated_token_up16(
        world: World, clock: FakeClock, metrics: Metrics, source: FileSource) -> None:
    pipeline = pipeline_for(world, clock, metrics, source, impersonate=True)
    first = world.token_file.read_text()
    await pipeline.federated_token()
    clock.advance(48 * 60)  # kubelet rotates at ~80 % of the token's hour
    rotated = world.write_token()
    await pipeline.federated_token()
    assert rotated != first
    assert [r.form["subject_token"] for r in world.google.requests] == [first, rotated]


async def test_list_valued_aud_of_a_projected_token_is_exchanged_up16(
        world: World, clock: FakeClock, metrics: Metrics, source: FileSource) -> None:
    claims = jwt.decode(world.token_file.read_text(), options={"verify_signature": False})
    assert isinstance(claims["aud"], list)  # kube-apiserver always writes a list
    federated = await pipeline_for(world, clock, metrics, source, impersonate=False).federated_token()
    assert world.google.token_info(federated.value) is not None


# -- UP-19: single flight ------------------------------------------------------------------------


def credentials_for(world: World, clock: FakeClock, metrics: Metrics, *, impersonate: bool) -> CachedCredentials:
    # An in-memory source (the file source reads in a worker thread), so that ``settle()`` reliably
    # lets the single exchange reach the stalled STS.
    source = MemorySource(world.token_file.read_text())
    return build_credentials(pipeline_for(world, clock, metrics, source, impersonate=impersonate), clock=clock,
                             metrics=metrics)


async def test_a_burst_of_access_token_requests_on_a_cold_cache_makes_one_sts_and_one_iam_call_up19(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    credentials = credentials_for(world, clock, metrics, impersonate=True)
    key_for = credentials.access_key
    released = world.google.stall("sts")  # hold the exchange so every request arrives while it is in flight
    burst = asyncio.gather(*(credentials.access_token(key_for(None), wait_s=WAIT_S) for _ in range(BURST)))
    await settle()
    assert world.google.calls == {"sts": 1}
    released.set()
    tokens = await burst
    assert world.google.calls == {"sts": 1, "generateAccessToken": 1}
    assert len({t.value for t in tokens}) == 1
    assert credentials.ready()


async def test_a_burst_without_impersonation_makes_one_sts_exchange_up19(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    credentials = credentials_for(world, clock, metrics, impersonate=False)
    key_for = credentials.access_key
    released = world.google.stall("sts")
    burst = asyncio.gather(*(credentials.access_token(key_for([STORAGE_SCOPE] if i % 2 else None), wait_s=WAIT_S)
                             for i in range(BURST)))
    await settle()
    released.set()
    tokens = await burst
    assert world.google.calls == {"sts": 1}  # without impersonation every scope set is the federated token
    assert len({t.value for t in tokens}) == 1


async def test_a_mixed_burst_shares_one_sts_exchange_and_makes_one_iam_call_per_key_up19(
        world: World, clock: FakeClock, metrics: Metrics) -> None:
    credentials = credentials_for(world, clock, metrics, impersonate=True)
    key_for = credentials.access_key
    released = world.google.stall("sts")
    id_key = IdTokenKey(audience="https://svc.example", format="full", licenses=False)
    requests = [credentials.access_token(key_for(None), wait_s=WAIT_S) for _ in range(BURST // 4)]
    requests += [credentials.access_token(key_for([STORAGE_SCOPE]), wait_s=WAIT_S) for _ in range(BURST // 4)]
    id_requests = [credentials.id_token(id_key, wait_s=WAIT_S) for _ in range(BURST // 2)]
    burst = asyncio.gather(asyncio.gather(*requests), asyncio.gather(*id_requests))
    await settle()
    assert world.google.calls == {"sts": 1}
    released.set()
    access_tokens, id_tokens = await burst
    assert world.google.calls == {"sts": 1, "generateAccessToken": 2, "generateIdToken": 1}
    assert len({t.value for t in access_tokens}) == 2
    assert len({t.value for t in id_tokens}) == 1
