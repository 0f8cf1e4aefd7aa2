"""Hostile HTTP input on the metadata listener, as raw bytes on a socket (issue #13; security.md
SEC-22..SEC-24): in node mode the callers are untrusted pods, so every shape here is one a pod can
send. Each response is read to the server's close where the server must close."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import pytest

from metaemu.cache.credentials import ID_CACHE_SIZE
from metaemu.server.handlers import LONG_POLL_LIMIT
from metaemu.server.runner import MetaemuServer
from metaemu.testing.world import SERVICE_ACCOUNT, World
from tests.helpers import SA_PATH, running_server, sample

EMAIL = SA_PATH + "email"
GOOD = b"Host: metadata.google.internal\r\nMetadata-Flavor: Google\r\n"
#: Bound on every read: a server that fails to answer fails the test instead of hanging it.
READ_S = 10.0


@pytest.fixture
async def server(world: World) -> AsyncIterator[MetaemuServer]:
    async with running_server(world, profile="gke") as s:
        yield s


def port_of(server: MetaemuServer) -> int:
    return server.metadata_address.port


async def exchange(server: MetaemuServer, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), READ_S)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def head_and_body(response: bytes) -> tuple[bytes, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


async def still_serves(server: MetaemuServer) -> None:
    response = await exchange(server, b"GET " + EMAIL.encode() + b" HTTP/1.1\r\n" + GOOD + b"Connection: close\r\n\r\n")
    assert status_of(response) == 200
    assert head_and_body(response)[1] == SERVICE_ACCOUNT.encode()


# -- oversized input: the statuses HTTP names (SEC-24) ---------------------------------------------

async def test_sec24_a_request_line_over_the_limit_is_414_and_the_connection_closes(server: MetaemuServer) -> None:
    response = await exchange(server, b"GET /computeMetadata/v1/" + b"a" * 9000 + b" HTTP/1.1\r\n" + GOOD + b"\r\n")
    head, body = head_and_body(response)
    assert re.match(rb"HTTP/1\.[01] 414 ", head)
    assert b"\r\nConnection: close" in head
    assert b"\r\nMetadata-Flavor: Google" in head
    assert body == b"414 URI Too Long\n"
    await still_serves(server)


@pytest.mark.parametrize("shape", ["long value", "long name", "too many fields"])
async def test_sec24_oversized_or_too_many_header_fields_are_431_and_the_connection_closes(
        server: MetaemuServer, shape: str) -> None:
    extra = {"long value": b"X-Padding: " + b"x" * 9000 + b"\r\n",
             "long name": b"X-" + b"p" * 9000 + b": 1\r\n",
             "too many fields": b"".join(b"X-Field-%d: 1\r\n" % i for i in range(200))}[shape]
    response = await exchange(server, b"GET " + EMAIL.encode() + b" HTTP/1.1\r\n" + GOOD + extra + b"\r\n")
    head, body = head_and_body(response)
    assert re.match(rb"HTTP/1\.[01] 431 ", head)
    assert b"\r\nConnection: close" in head
    assert body == b"431 Request Header Fields Too Large\n"
    assert b"\r\nMetadata-Flavor: Google" in head
    assert SERVICE_ACCOUNT.encode() not in response
    await still_serves(server)


async def test_sec24_a_request_just_inside_the_limits_is_served(server: MetaemuServer) -> None:
    target = EMAIL.encode() + b"?pad=" + b"a" * (8000 - len(EMAIL))
    fields = b"X-Padding: " + b"x" * 8000 + b"\r\n" + b"".join(b"X-Field-%d: 1\r\n" % i for i in range(90))
    response = await exchange(server, b"GET " + target + b" HTTP/1.1\r\n" + GOOD + fields
                              + b"Connection: close\r\n\r\n")
    assert status_of(response) == 200


# -- methods and request targets (SEC-22, SEC-23) --------------------------------------------------

@pytest.mark.parametrize("line", [
    b"CONNECT metadata.google.internal:80 HTTP/1.1",
    b"CONNECT 169.254.169.254:443 HTTP/1.1",
    b"PROPFIND " + EMAIL.encode() + b" HTTP/1.1",
    b"MKCOL /computeMetadata/v1/x HTTP/1.1",
    b"PURGE " + EMAIL.encode() + b" HTTP/1.1",
    b"OPTIONS * HTTP/1.1",
])
async def test_sec23_connect_and_every_other_unserved_method_is_405_with_allow(server: MetaemuServer,
                                                                              line: bytes) -> None:
    response = await exchange(server, line + b"\r\n" + GOOD + b"Connection: close\r\n\r\n")
    head, body = head_and_body(response)
    assert head.startswith(b"HTTP/1.1 405 "), head
    assert b"\r\nAllow: GET\r\n" in head + b"\r\n"
    assert b"\r\nServer: GKE Metadata Server" in head
    assert SERVICE_ACCOUNT.encode() not in body
    assert sample(server.metrics, "metaemu_blocked_requests_total", reason="method") == 1


@pytest.mark.parametrize(("authority", "host", "status"), [
    (b"attacker.example", b"metadata.google.internal", 403),  # the target's authority is judged, not Host
    (b"attacker.example:80", b"169.254.169.254", 403),
    (b"metadata.google.internal.attacker.example", b"metadata.google.internal", 403),
    (b"metadata.google.internal", b"attacker.example", 200),  # RFC 9112 3.2.2: Host is ignored
    (b"169.254.169.254", b"169.254.169.254", 200),
    (b"metadata", b"metadata", 200),
])
async def test_sec22_an_absolute_form_target_is_judged_by_its_own_authority(
        server: MetaemuServer, authority: bytes, host: bytes, status: int) -> None:
    response = await exchange(server, b"GET http://" + authority + EMAIL.encode() + b" HTTP/1.1\r\nHost: " + host
                              + b"\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n")
    assert status_of(response) == status
    assert (SERVICE_ACCOUNT.encode() in response) == (status == 200)
    if status == 403:
        assert sample(server.metrics, "metaemu_blocked_requests_total", reason="host") == 1


async def test_sec22_an_absolute_form_target_for_another_scheme_is_refused(server: MetaemuServer) -> None:
    response = await exchange(server, b"GET https://metadata.google.internal" + EMAIL.encode() + b" HTTP/1.1\r\n"
                              + GOOD + b"Connection: close\r\n\r\n")
    assert status_of(response) == 403
    assert SERVICE_ACCOUNT.encode() not in response


# -- identity-bearing headers are never "first one wins" -------------------------------------------

@pytest.mark.parametrize("second", [b"Other", b"", b"google"])
async def test_r04_metadata_flavor_twice_with_different_values_is_403(server: MetaemuServer, second: bytes) -> None:
    for path in (EMAIL, SA_PATH + "token"):
        response = await exchange(server, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: metadata.google.internal\r\n"
                                  b"Metadata-Flavor: Google\r\nMetadata-Flavor: " + second
                                  + b"\r\nConnection: close\r\n\r\n")
        _, body = head_and_body(response)
        assert status_of(response) == 403
        assert b"access_token" not in body and SERVICE_ACCOUNT.encode() not in body
    assert sample(server.metrics, "metaemu_blocked_requests_total", reason="metadata_flavor") == 2


async def test_r04_metadata_flavor_twice_with_the_same_value_is_served(server: MetaemuServer) -> None:
    response = await exchange(server, b"GET " + EMAIL.encode() + b" HTTP/1.1\r\n" + GOOD
                              + b"Metadata-Flavor: Google\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200


# -- what already holds: smuggling shapes, slow headers, idle connections --------------------------

@pytest.mark.parametrize("shape", [
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"Content-Length: 0\r\nContent-Length: 5\r\n\r\n",
    b"X-Folded: a\r\n  continued\r\n\r\n",
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"Transfer-Encoding: gzip, chunked, identity\r\n\r\n",
    b"Content-Length: -1\r\n\r\n",
])
async def test_smuggling_shapes_get_400_and_a_close(server: MetaemuServer, shape: bytes) -> None:
    response = await exchange(server, b"GET " + EMAIL.encode() + b" HTTP/1.1\r\n" + GOOD + shape
                              + b"GET " + SA_PATH.encode() + b"token HTTP/1.1\r\n" + GOOD + b"\r\n")
    head, body = head_and_body(response)
    assert status_of(response) == 400
    assert body == b"400 Bad Request\n"  # the offending bytes are never echoed
    assert b"\r\nConnection: close" in head
    assert response.count(b"HTTP/1.") == 1  # closed after the 400: the smuggled request is never read
    assert b"access_token" not in response
    assert sample(server.metrics, "metaemu_blocked_requests_total", reason="malformed") == 1
    await still_serves(server)


async def test_sec24_slow_headers_are_cut_at_10_s_while_others_are_served(server: MetaemuServer) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    opened = loop.time()
    try:
        writer.write(b"GET " + EMAIL.encode() + b" HTTP/1.1\r\nHost: metadata.google.internal\r\n")
        await writer.drain()
        await still_serves(server)  # served while the slow one holds its connection
        assert await asyncio.wait_for(reader.read(), 30) == b""  # cut by the server, not answered
        assert loop.time() - opened >= 9.9  # not before the documented deadline
    finally:
        writer.close()


async def test_sec35_a_thousand_idle_connections_do_not_stop_a_token_request(server: MetaemuServer) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(1000):
            _, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            stack.callback(writer.close)
        response = await exchange(server, b"GET " + SA_PATH.encode() + b"token HTTP/1.1\r\n" + GOOD
                                  + b"Connection: close\r\n\r\n")
        assert status_of(response) == 200
        assert b'"access_token"' in response


# -- long polls: a departed client frees its slot at once ------------------------------------------

async def until_long_polls(server: MetaemuServer, count: int) -> None:
    for _ in range(2000):  # polls a gauge; each round yields to the server's tasks
        if sample(server.metrics, "metaemu_long_polls_in_flight") == count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"long polls in flight never reached {count}")


async def test_q13_disconnected_long_polls_free_their_slots_at_once(server: MetaemuServer) -> None:
    poll = (b"GET /computeMetadata/v1/project/project-id?wait_for_change=true&timeout_sec=300 HTTP/1.1\r\n"
            + GOOD + b"\r\n")
    writers = []
    try:
        for _ in range(LONG_POLL_LIMIT):
            _, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(poll)
            writers.append(writer)
        await until_long_polls(server, LONG_POLL_LIMIT)
        assert status_of(await exchange(server, poll.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))) == 503
        for writer in writers:  # every holder leaves
            writer.close()
        await until_long_polls(server, 0)
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writers.append(writer)
        writer.write(poll)
        await until_long_polls(server, 1)  # a new long poll is held, not refused
    finally:
        for writer in writers:
            writer.close()
    await until_long_polls(server, 0)


# -- Expect: no body is ever read, so no expectation is ever acted on ------------------------------

@pytest.mark.parametrize("expect", [b"100-continue", b"\xa0Google", b"something-else"])
async def test_expect_is_ignored_and_the_final_answer_sent_at_once(server: MetaemuServer, expect: bytes) -> None:
    # RFC 9110 10.1.1 lets a server answer with the final status; aiohttp's own handling echoed
    # the value in a 417, and answered 500 when it was not UTF-8 (found by the fuzz test).
    for method, status in ((b"GET", 200), (b"CONNECT", 405)):
        target = b"metadata.google.internal:80" if method == b"CONNECT" else EMAIL.encode()
        response = await exchange(server, method + b" " + target + b" HTTP/1.1\r\n" + GOOD + b"Expect: " + expect
                                  + b"\r\nConnection: close\r\n\r\n")
        assert status_of(response) == status, response
        assert b"100 Continue" not in response


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(server: MetaemuServer) -> None:
    # printf 'GET ...' | nc -N: aiohttp closed on the EOF and dropped the answer; Go's server answers.
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    try:
        writer.write(b"GET " + EMAIL.encode() + b" HTTP/1.1\r\n" + GOOD + b"\r\n")
        writer.write_eof()
        response = await asyncio.wait_for(reader.read(), READ_S)
    finally:
        writer.close()
    assert status_of(response) == 200
    assert response.endswith(SERVICE_ACCOUNT.encode())


# -- thousands of ID-token audiences: memory stays bounded -----------------------------------------

def retained(server: MetaemuServer) -> tuple[int, int, int]:
    """What a flood of distinct audiences could grow: cached ID tokens, the handler's memos, and
    the metric samples (labels never carry an audience)."""
    creds = server.components.credentials
    handler = server.components.handler
    samples = sum(len(family.samples) for family in server.metrics.registry.collect())
    return len(creds.identity), len(handler._scope_keys) + len(handler._hosts_seen), samples


async def test_sec35_memory_stays_flat_across_thousands_of_id_token_audiences(server: MetaemuServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))

    async def identity(i: int) -> None:
        writer.write(b"GET " + SA_PATH.encode() + b"identity?audience=https://svc-%d.example HTTP/1.1\r\n" % i
                     + GOOD + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_S)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(re.search(rb"\r\nContent-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert (await reader.readexactly(length)).startswith(b"eyJ")

    try:
        for i in range(ID_CACHE_SIZE + 1):  # full, and one eviction (its metric sample now exists)
            await identity(i)
        full = retained(server)
        assert full[0] == ID_CACHE_SIZE
        for i in range(ID_CACHE_SIZE + 1, ID_CACHE_SIZE + 1501):  # 1500 more: each evicts one, nothing grows
            await identity(i)
        assert retained(server) == full
        assert sample(server.metrics, "metaemu_token_cache_total", kind="id_token", result="evict") == 1501
    finally:
        writer.close()
