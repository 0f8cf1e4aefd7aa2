"""The read-header deadline (security.md SEC-24): a connection that does not deliver its first
request's headers in time is closed; one that does is served normally, including keep-alive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from metaemu.server.deadline import HeaderDeadline

DEADLINE_S = 0.2


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    factory = runner.server
    assert factory is not None
    server = await asyncio.get_running_loop().create_server(
        lambda: HeaderDeadline(factory(), deadline_s=DEADLINE_S), "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await runner.cleanup()


async def test_sec24_a_silent_client_is_cut_off_after_the_deadline(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed by the server (bounded wait)
    writer.close()


async def test_a_client_that_sends_its_headers_is_served_and_kept_alive(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(2) == b"ok"
        await asyncio.sleep(DEADLINE_S)  # past the deadline: it applies to the first headers only
    writer.close()
