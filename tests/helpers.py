"""Shared test helpers: a running metaemu against the in-process Google stand-in, and a small
HTTP client for the metadata API that returns status, headers and raw body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from multidict import CIMultiDictProxy
from yarl import URL

from metaemu.clock import Clock
from metaemu.config import parse_config
from metaemu.metrics import Metrics
from metaemu.server.runner import MetaemuServer
from metaemu.testing.world import World

FLAVOR = {"Metadata-Flavor": "Google"}
SA_PATH = "/computeMetadata/v1/instance/service-accounts/default/"


@contextlib.asynccontextmanager
async def running_server(world: World, *, clock: Clock | None = None, wait_ready: bool = True,
                         **overrides: Any) -> AsyncIterator[MetaemuServer]:
    """metaemu on 127.0.0.1:0 whose upstream calls go to ``world.google`` in process."""
    raw = world.config(sts_url="http://sts.googleapis.test/v1/token", iam_url="http://iamcredentials.test/v1",
                       **overrides)
    config = parse_config(raw, hostname="node-1", base_dir=world.token_file.parent)
    server = MetaemuServer(config, clock=clock, http=world.google.client(clock=clock))
    async with server:
        if wait_ready:
            creds = server.components.credentials
            with contextlib.suppress(Exception):
                await creds.access.get(creds.default_scopes, wait_s=5.0)
        yield server


async def serving_ports(proc: asyncio.subprocess.Process, *, timeout_s: float = 30.0) -> tuple[int, int, list[str]]:
    """The metadata and admin ports of a ``metaemu serve`` child given port 0 for both, read from
    its ``serving`` log line (so no port is picked, released and hoped to stay free), and the
    stderr lines read up to it, which the caller's log assertions must include."""
    assert proc.stderr is not None
    stderr, lines = proc.stderr, []

    async def serving() -> dict[str, Any]:
        while raw := await stderr.readline():
            lines.append(raw.decode())
            with contextlib.suppress(ValueError):
                record = json.loads(raw)
                if isinstance(record, dict) and record.get("msg") == "serving":
                    return record
        raise AssertionError("metaemu exited before serving:\n" + "".join(lines))

    record = await asyncio.wait_for(serving(), timeout_s)
    return (int(record["listen"].rpartition(":")[2]), int(record["admin_listen"].rpartition(":")[2]), lines)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


class Mds:
    """Raw HTTP against a metadata listener: no redirects followed, raw paths kept."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def close(self) -> None:
        await self._session.close()

    async def get(self, path: str, *, headers: dict[str, str] | None = None, method: str = "GET",
                  flavor: bool = True) -> Reply:
        hdrs = dict(FLAVOR if flavor else {}) | (headers or {})
        url = URL(self.base_url + path, encoded=True)
        async with self._session.request(method, url, headers=hdrs, allow_redirects=False) as resp:
            return Reply(resp.status, resp.headers, await resp.read())


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def assert_no_jwt_from(issuer: str, body: str) -> None:
    """SEC-25: no JWT issued by ``issuer`` (the cluster) appears anywhere in a response body."""
    for candidate in re.findall(r"[\w-]+\.[\w-]+\.[\w-]+", body):
        try:
            claims = jwt.decode(candidate, options={"verify_signature": False})
        except jwt.PyJWTError:
            continue
        assert claims.get("iss") != issuer
