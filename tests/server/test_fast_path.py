"""FastPathProtocol's connection handling (issue #12): the deadlines the full path enforces hold on
a connection the fast path answers too, a stop closes its idle connections, and back-pressure or a
partial read hands the connection to aiohttp with every byte. What it answers, byte for byte, is
tests/server/test_fast_path_differential.py's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from unittest import mock

import pytest

from metaemu.server import fast_path, runner
from metaemu.server.fast_path import FastAnswers, FastPathProtocol
from metaemu.server.runner import MetaemuServer
from metaemu.testing.world import World
from tests.helpers import SA_PATH, running_server

SHORT_S = 0.2
EMAIL = (f"GET {SA_PATH}email HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n"
         .encode())
#: A bound on waiting for what the server does after SHORT_S (the wait is for an event: the close).
BOUND_S = 10.0


@pytest.fixture
async def server(world: World, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MetaemuServer]:
    monkeypatch.setattr(fast_path, "HEADER_DEADLINE_S", SHORT_S)
    monkeypatch.setattr(runner, "IDLE_TIMEOUT_S", SHORT_S)
    async with running_server(world) as started:
        yield started


async def connect(server: MetaemuServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.metadata_address.port)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


def served(server: MetaemuServer) -> int:
    assert server.components.fast is not None
    return server.components.fast.served


async def test_sec24_a_silent_connection_is_closed_at_the_read_header_deadline(server: MetaemuServer) -> None:
    reader, writer = await connect(server)
    assert await asyncio.wait_for(reader.read(), BOUND_S) == b""
    writer.close()


async def test_sec24_a_partial_head_is_handed_over_with_the_deadline_still_running(server: MetaemuServer) -> None:
    reader, writer = await connect(server)
    writer.write(EMAIL[:30])  # never finished: aiohttp holds it, under what is left of the deadline
    assert await asyncio.wait_for(reader.read(), BOUND_S) == b""
    assert served(server) == 0
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(server: MetaemuServer) -> None:
    reader, writer = await connect(server)
    for _ in range(3):
        writer.write(EMAIL)
        assert (await read_answer(reader)).startswith(b"HTTP/1.1 200 OK\r\n")
    assert served(server) == 3
    assert await asyncio.wait_for(reader.read(), BOUND_S) == b""  # then idle: closed, as aiohttp does
    writer.close()


async def test_a_request_split_over_two_reads_is_answered_by_aiohttp_on_the_same_connection(
        server: MetaemuServer) -> None:
    reader, writer = await connect(server)
    writer.write(EMAIL[:25])
    await writer.drain()
    await asyncio.sleep(0)  # let the first read arrive on its own (the outcome is the same if not)
    writer.write(EMAIL[25:])
    answer = await read_answer(reader)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"@demo-project.iam.gserviceaccount.com")
    writer.close()


async def test_stop_closes_idle_fast_connections(world: World) -> None:
    async with running_server(world) as started:
        reader, writer = await connect(started)
        writer.write(EMAIL)
        await read_answer(reader)
        stopping = asyncio.ensure_future(started.stop())
        assert await asyncio.wait_for(reader.read(), BOUND_S) == b""
        await stopping
        writer.close()


def test_back_pressure_hands_the_next_request_to_aiohttp_paused() -> None:
    answers = mock.Mock(spec=FastAnswers)
    inner = mock.Mock(spec=asyncio.Protocol)
    transport = mock.Mock(spec=asyncio.Transport)
    loop = asyncio.new_event_loop()
    try:
        async def scenario() -> None:
            protocol = FastPathProtocol(answers=answers, full=lambda: inner, open_connections=set(),
                                        idle_timeout_s=30)
            protocol.connection_made(transport)
            answers.answer.return_value = b"HTTP/1.1 200 OK\r\n\r\n"
            protocol.data_received(EMAIL)
            transport.write.assert_called_once()
            protocol.pause_writing()  # the client is not reading
            protocol.data_received(EMAIL)
            transport.set_protocol.assert_called_once_with(inner)
            calls: list[Any] = [c[0] for c in inner.method_calls]
            assert calls == ["connection_made", "pause_writing", "data_received"]
            assert inner.data_received.call_args.args == (EMAIL,)
            assert answers.answer.call_count == 1  # not even asked
            transport.close.assert_not_called()

        loop.run_until_complete(scenario())
    finally:
        loop.close()
