"""Fault injection against a running metaemu on a fake clock: upstream errors, timeouts, denials,
garbage, a missing or bad token file. Each asserts the exact status, body and metric, and that the
process keeps serving (gce-metadata.md ERR-03, ERR-05, ERR-06, GKE-08, T-05, T-06; security.md
SEC-28, SEC-29, SEC-36)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.world import AUDIENCE, World, build_world
from tests.helpers import SA_PATH, Mds, running_server, sample

TOKEN = SA_PATH + "token"


@dataclass
class Rig:
    world: World
    clock: FakeClock
    server: MetaemuServer
    mds: Mds
    admin: Mds

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.server.metrics, name, **labels)

    async def advance(self, seconds: float, step: float = 30.0, *, quiesce: bool = True) -> None:
        """Move fake time in steps; after each, let the refresher run and (with ``quiesce``) wait
        until no fetch is in flight. Fetches read the token file in a worker thread, so yielding
        to the loop alone does not guarantee they finished; this waits on that condition, bounded."""
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step
            await settle(50)
            if quiesce:
                await self.quiesce()

    async def quiesce(self) -> None:
        creds = self.server.components.credentials
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while any(c.in_flight for c in (creds.federated, creds.access, creds.identity)):
            assert loop.time() < deadline, "a fetch did not finish"
            await asyncio.sleep(0.001)
        await settle(50)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def world(tmp_path: Path, clock: FakeClock) -> World:
    """The stand-ins share metaemu's fake clock, so tokens expire in simulated time."""
    return build_world(tmp_path, clock=clock)


@pytest.fixture
async def rig_factory(world: World, clock: FakeClock) -> AsyncIterator[list[Rig]]:
    rigs: list[Rig] = []
    yield rigs
    for rig in rigs:
        await rig.mds.close()
        await rig.admin.close()


async def start(world: World, clock: FakeClock, rigs: list[Rig], *, quiesce: bool = True,
                **overrides: object) -> tuple[Rig, object]:
    cm = running_server(world, clock=clock, wait_ready=False, **overrides)
    server = await cm.__aenter__()
    rig = Rig(world, clock, server, Mds(server.metadata_url), Mds(server.admin_url))
    rigs.append(rig)
    await settle(50)
    if quiesce:
        await rig.quiesce()
    return rig, cm


@pytest.fixture
async def rig(world: World, clock: FakeClock, rig_factory: list[Rig]) -> AsyncIterator[Rig]:
    r, cm = await start(world, clock, rig_factory)
    yield r
    await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


@pytest.fixture
async def sts_down_rig(world: World, clock: FakeClock, rig_factory: list[Rig]) -> AsyncIterator[Rig]:
    world.google.fail("sts", status=503, times=1000)
    r, cm = await start(world, clock, rig_factory)
    yield r
    await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def test_err05_sts_unavailable_at_start_is_503_with_retry_after_never_404(sts_down_rig: Rig) -> None:
    r = await sts_down_rig.mds.get(TOKEN)
    assert r.status == 503
    assert r.headers["Retry-After"] == "2"
    assert r.text.startswith("Unable to generate access token right now; sts returned 503")
    assert r.text.endswith("Retry shortly.\n")
    assert sts_down_rig.metric("metaemu_upstream_errors_total", backend="sts", status="503") >= 1
    assert sts_down_rig.metric("metaemu_refresh_total", kind="access_token", result="error") >= 1
    # GKE-08: identity-bearing paths answer 503, never 404, before the first token
    assert (await sts_down_rig.mds.get(SA_PATH + "identity?audience=x")).status == 503


async def test_sec29_sec36_backoff_bounds_upstream_calls_and_liveness_stays_up(sts_down_rig: Rig) -> None:
    rig = sts_down_rig
    for _ in range(200):
        assert (await rig.mds.get(TOKEN)).status == 503
    assert rig.world.google.calls["sts"] <= 2  # 200 requests, no per-request exchanges
    assert (await rig.admin.get("/healthz", flavor=False)).status == 200
    ready = await rig.admin.get("/readyz", flavor=False)
    assert (ready.status, ready.text) == (503, "not ready: no default access token cached yet\n")


async def test_recovers_after_upstream_returns_without_restart(sts_down_rig: Rig) -> None:
    rig = sts_down_rig
    assert (await rig.mds.get(TOKEN)).status == 503
    rig.world.google.clear_faults()
    await rig.advance(120)  # past the capped backoff
    r = await rig.mds.get(TOKEN)
    assert r.status == 200
    assert (await rig.admin.get("/readyz", flavor=False)).status == 200


async def test_err06_iam_denial_is_403_with_the_upstream_reason(rig: Rig) -> None:
    rig.world.google.revoke("demo-app@demo-project.iam.gserviceaccount.com", rig.world.principal)
    r = await rig.mds.get(TOKEN + "?scopes=https://www.googleapis.com/auth/devstorage.read_only")
    assert r.status == 403
    assert r.text.startswith("Unable to generate access token; iam returned 403: Permission "
                             "'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).")
    assert "missing IAM policy binding" in r.text
    assert rig.metric("metaemu_upstream_errors_total", backend="iam", status="403") == 1
    r = await rig.mds.get(SA_PATH + "identity?audience=https://x.example")
    assert r.status == 403
    assert r.text.startswith("Unable to generate ID token; iam returned 403:")


async def test_sts_invalid_grant_is_403_naming_the_problem(world: World, clock: FakeClock,
                                                          rig_factory: list[Rig]) -> None:
    world.token_file.write_text(world.issuer.mint_kubernetes(namespace="default", service_account="demo-app",
                                                             audience="https://wrong.example"))
    rig, cm = await start(world, clock, rig_factory)
    try:
        r = await rig.mds.get(TOKEN)
        assert r.status == 403
        assert r.text.startswith("Unable to generate access token; sts returned 400: invalid_grant")
        assert "allowed audiences" in r.text
        assert rig.metric("metaemu_upstream_errors_total", backend="sts", status="400") == 1
    finally:
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("content", "reason"), [
    (None, "does not exist"),
    ("", "is empty"),
    ("garbage-not-a-jwt", "does not hold a JWT"),
])
async def test_bad_token_file_is_503_naming_the_file(world: World, clock: FakeClock, rig_factory: list[Rig],
                                                     content: str | None, reason: str) -> None:
    if content is None:
        world.token_file.unlink()
    else:
        world.token_file.write_text(content)
    rig, cm = await start(world, clock, rig_factory)
    try:
        r = await rig.mds.get(TOKEN)
        assert r.status == 503
        assert str(world.token_file) in r.text
        assert reason in r.text
        assert world.google.calls["sts"] == 0  # nothing was sent
        assert rig.metric("metaemu_refresh_total", kind="access_token", result="error") >= 1
        world.write_token()  # kubelet catches up: served after the backoff, no restart
        await rig.advance(120)
        assert (await rig.mds.get(TOKEN)).status == 200
    finally:
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def test_sts_timeout_is_503_then_counted_as_no_response(world: World, clock: FakeClock,
                                                             rig_factory: list[Rig]) -> None:
    world.google.stall("sts")
    rig, cm = await start(world, clock, rig_factory, quiesce=False, endpoints={"sts": "http://sts.test/v1/token",
                                                               "iam_credentials": "http://iam.test/v1",
                                                               "timeout_seconds": 5})
    try:
        request = asyncio.create_task(rig.mds.get(TOKEN))
        # Sleepers: the refresher, the access-token fetch waiting on the federated token, the
        # stalled STS call's deadline, and finally the request waiting for the token.
        await rig.clock.wait_for_sleepers(4, rounds=100_000)
        await rig.advance(2.0, step=1.0, quiesce=False)  # the request's 2 s deadline passes first
        r = await request
        assert (r.status, r.headers["Retry-After"]) == (503, "2")
        assert "still in progress" in r.text
        # Then the upstream deadline (5 s after the call started). One step, so the backoff retry
        # (0.5-1 s later) has not started yet and the failure is what a request sees.
        await rig.advance(3.0, step=3.0, quiesce=False)
        await rig.quiesce()
        assert rig.metric("metaemu_upstream_errors_total", backend="sts", status="0") == 1
        r = await rig.mds.get(TOKEN)
        assert r.status == 503
        assert "sts unreachable: no response within 5s" in r.text
    finally:
        world.google.unstall("sts")
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["sts", "iam"])
async def test_garbage_upstream_body_is_503(world: World, clock: FakeClock, rig_factory: list[Rig],
                                            backend: str) -> None:
    world.google.garbage(backend, times=1000)  # type: ignore[arg-type]
    rig, cm = await start(world, clock, rig_factory)
    try:
        r = await rig.mds.get(TOKEN)
        assert r.status == 503
        assert f"{backend} returned 200: response body is not a JSON object" in r.text
    finally:
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def test_sec28_stale_token_served_while_refresh_fails_then_503_never_expired(rig: Rig) -> None:
    first = json.loads((await rig.mds.get(TOKEN)).body)
    rig.world.google.fail("iam", status=500, times=100_000)
    await rig.advance(2000)  # past the refresh point: refreshes now fail
    r = await rig.mds.get(TOKEN)
    body = json.loads(r.body)
    assert body["access_token"] == first["access_token"]  # still valid: served
    assert 300 <= body["expires_in"] <= 3600 - 2000
    assert rig.metric("metaemu_stale_served_total") >= 1
    assert rig.metric("metaemu_refresh_total", kind="access_token", result="error") >= 1
    await rig.advance(3600 - 2000 - 300 + 1)  # less than 300 s left: T-05, never served
    r = await rig.mds.get(TOKEN)
    assert r.status == 503
    assert b"access_token" not in r.body
    assert "iam returned 500" in r.text


async def test_t02_t05_refreshed_in_background_so_requests_never_wait(rig: Rig) -> None:
    seen = set()
    for _ in range(12):  # six simulated hours in 30-minute strides
        r = await rig.mds.get(TOKEN)
        body = json.loads(r.body)
        assert body["expires_in"] >= 300
        seen.add(body["access_token"])
        for _ in range(3):
            rig.world.write_token()  # kubelet rotates the projected token
            await rig.advance(600)
    assert len(seen) >= 6
    assert rig.world.google.calls["sts"] <= 8  # about one exchange per simulated hour


async def test_no_audience_mismatch_for_federated_principal(rig: Rig) -> None:
    sts = [r for r in rig.world.google.requests if r.endpoint == "sts"]
    assert sts
    assert sts[0].form["audience"] == AUDIENCE


async def test_t06_token_already_below_the_floor_from_upstream_is_never_served(rig: Rig) -> None:
    # Google's clock 59 min 55 s behind ours: every token it mints looks nearly expired here.
    rig.world.google.fail("iam", status=200, times=10, body={"accessToken": "ya29.skewed",
                                                             "expireTime": "2026-11-22T05:00:05Z"})
    r = await rig.mds.get(TOKEN + "?scopes=https://www.googleapis.com/auth/pubsub")
    assert r.status == 503
    assert "below the 300 s floor" in r.text
    assert b"ya29.skewed" not in r.body


async def test_sec30_no_fallback_to_the_hosts_own_credentials(world: World, clock: FakeClock, rig_factory: list[Rig],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the WIF path failing, metaemu never serves a token from credentials lying around on the
    host (ADC file, gcloud): such a token endpoint is never even contacted."""
    calls: list[str] = []

    async def oauth(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.json_response({"access_token": "ya29.HOST-CREDENTIALS", "expires_in": 3600})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", oauth)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r",
                               "token_uri": f"http://127.0.0.1:{runner.addresses[0][1]}/token"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    world.google.fail("sts", status=503, times=1000)
    rig, cm = await start(world, clock, rig_factory)
    try:
        r = await rig.mds.get(TOKEN)
        assert r.status == 503
        assert b"HOST-CREDENTIALS" not in r.body
        assert calls == []
    finally:
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
        await runner.cleanup()
