"""Upstream calls per identity per simulated hour under sustained token requests.

In one process: metaemu on a loopback socket, its upstream calls going to the in-process Google
stand-in, and both driven by one ``FakeClock`` (tokens the stand-in mints expire in fake time).
Each step advances the clock, lets the refresher run, then sends a burst of token requests over
HTTP; kubelet's rotation of the projected token is mimicked. ``FakeGoogle.calls`` counts what
reached Google. The same run at two request rates shows the call rate does not follow the request
rate.

Not owned here: the stand-in (``metaemu.testing``); real-time figures (``throughput.py``).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from metaemu.config import parse_config
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.world import build_world

FLAVOR = {"Metadata-Flavor": "Google"}
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
#: kubelet rewrites a projected token at ~80 % of its 1 h lifetime (as ``metaemu demo`` does).
TOKEN_ROTATE_S = 0.8 * 3600
#: Real-time bound on waiting for the refreshes a clock step started (file reads run in a thread).
SETTLE_DEADLINE_S = 5.0
#: Real-time bound on one burst of requests: a request that would wait on fake time never returns.
BURST_TIMEOUT_S = 10.0
UPSTREAM_ENDPOINTS = ("sts", "generateAccessToken", "generateIdToken")


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamRun:
    requests_per_step: int
    step_s: float
    hours: float
    requests: int
    statuses: dict[int, int]
    calls: dict[str, int]  # upstream endpoint -> calls over the whole run (start-up included)
    wall_s: float

    def per_hour(self, endpoint: str) -> float:
        return self.calls.get(endpoint, 0) / self.hours

    @property
    def request_rate(self) -> float:
        """Token requests per simulated second."""
        return self.requests_per_step / self.step_s

    def as_json(self) -> dict[str, Any]:
        return {"requests_per_step": self.requests_per_step, "step_s": self.step_s, "hours": self.hours,
                "requests": self.requests, "statuses": self.statuses, "calls": self.calls,
                "per_hour": {e: self.per_hour(e) for e in UPSTREAM_ENDPOINTS}, "wall_s": self.wall_s}


def measure_upstream_calls(*, hours: float, step_s: float, requests_per_step: int) -> UpstreamRun:
    return asyncio.run(_simulate(hours=hours, step_s=step_s, requests_per_step=requests_per_step))


async def _simulate(*, hours: float, step_s: float, requests_per_step: int) -> UpstreamRun:
    started = time.perf_counter()
    clock = FakeClock()
    statuses: Counter[int] = Counter()
    with tempfile.TemporaryDirectory(prefix="metaemu-bench-") as tmp:
        world = build_world(Path(tmp), clock=clock)
        raw = world.config(sts_url="http://sts.googleapis.test/v1/token", iam_url="http://iamcredentials.test/v1")
        config = parse_config(raw, hostname="bench", base_dir=Path(tmp))
        server = MetaemuServer(config, clock=clock, http=world.google.client(clock=clock))
        async with server, aiohttp.ClientSession(headers=FLAVOR) as session:
            url = server.metadata_url + TOKEN_PATH
            await _refreshes_done()
            steps = round(hours * 3600 / step_s)
            last_rotation = clock.monotonic()
            for _ in range(steps):
                clock.advance(step_s)
                if clock.monotonic() - last_rotation >= TOKEN_ROTATE_S:
                    world.write_token()
                    last_rotation = clock.monotonic()
                await _refreshes_done()
                async with asyncio.timeout(BURST_TIMEOUT_S):
                    for status in await asyncio.gather(*(_get(session, url) for _ in range(requests_per_step))):
                        statuses[status] += 1
        calls = {e: world.google.calls[e] for e in UPSTREAM_ENDPOINTS}
    return UpstreamRun(requests_per_step=requests_per_step, step_s=step_s, hours=steps * step_s / 3600,
                       requests=steps * requests_per_step, statuses=dict(sorted(statuses.items())), calls=calls,
                       wall_s=time.perf_counter() - started)


async def _get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def _refreshes_done() -> None:
    """Let tasks woken by the clock run, then wait (in real time) until no token fetch is in flight.

    ``TokenCache`` names its fetch tasks ``fetch-<kind>``; a fetch reads the projected token in a
    worker thread, so yielding to the loop alone does not finish it.
    """
    await settle()
    deadline = time.perf_counter() + SETTLE_DEADLINE_S
    while any(t.get_name().startswith("fetch-") for t in asyncio.all_tasks()):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"token fetches still running after {SETTLE_DEADLINE_S:g}s of real time")
        await asyncio.sleep(0.0005)
    await settle()
