"""``FaultyKube`` forwards what it is not told to fault, unchanged, and faults exactly what it is
told to: checked over a transport that records what reaches it (no Kubernetes involved)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from metaemu.pods.stream import LineStream
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.kube_faults import FaultyKube, endpoint_of
from metaemu.transport import HttpRequest, HttpResponse, TransportFailure

SERVER = "https://127.0.0.1:6443"


class Recorder:
    """A transport answering 200 ``{"path": ...}``, and watches with the lines it is handed."""

    def __init__(self) -> None:
        self.sent: list[HttpRequest] = []
        self.lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def send(self, request: HttpRequest) -> HttpResponse:
        self.sent.append(request)
        return HttpResponse(status=200, headers={}, body=json.dumps({"url": request.url}).encode())

    @contextlib.asynccontextmanager
    async def open(self, request: HttpRequest) -> AsyncIterator[LineStream]:
        self.sent.append(request)

        async def lines() -> AsyncIterator[bytes]:
            while (line := await self.lines.get()) is not None:
                yield line

        yield LineStream(status=200, headers={}, lines=lines())


def get(path: str, *, timeout_s: float = 10.0) -> HttpRequest:
    return HttpRequest(method="GET", url=SERVER + path, headers={"Authorization": "Bearer b-1"}, timeout_s=timeout_s)


@pytest.mark.parametrize(("method", "path", "query", "endpoint"), [
    ("GET", "/api/v1/pods", {}, "list"),
    ("GET", "/api/v1/namespaces/a/pods", {"watch": "true"}, "watch"),
    ("GET", "/api/v1/namespaces/a/serviceaccounts/b", {}, "get"),
    ("POST", "/api/v1/namespaces/a/serviceaccounts/b/token", {}, "token"),
    ("GET", "/api/v1/nodes/n", {}, "node_get"),
    ("PATCH", "/api/v1/nodes/n", {}, "node_patch"),
    ("DELETE", "/api/v1/nodes/n", {}, "other"),
    ("GET", "/api/v1/namespaces/a/secrets/b", {}, "other"),
])
def test_endpoints(method: str, path: str, query: dict[str, str], endpoint: str) -> None:
    assert endpoint_of(method, path, query) == endpoint


async def test_unfaulted_calls_are_forwarded_and_recorded() -> None:
    inner, clock = Recorder(), FakeClock()
    faulty = FaultyKube(inner, clock=clock)
    response = await faulty.send(get("/api/v1/pods?fieldSelector=spec.nodeName%3Dn"))
    assert response.status == 200 and len(inner.sent) == 1
    [call] = faulty.requests
    assert (call.endpoint, call.query, call.bearer) == ("list", {"fieldSelector": "spec.nodeName=n"}, "b-1")
    assert [(a.status, a.at) for a in faulty.answers] == [(200, clock.time())]


async def test_a_queued_fault_answers_once_without_reaching_the_server() -> None:
    inner = Recorder()
    faulty = FaultyKube(inner, clock=FakeClock())
    faulty.fail("list", status_code=410, reason="Expired")
    first = await faulty.send(get("/api/v1/pods"))
    assert first.status == 410 and json.loads(first.body)["reason"] == "Expired" and inner.sent == []
    assert (await faulty.send(get("/api/v1/pods"))).status == 200


async def test_a_stalled_call_times_out_on_the_test_clock() -> None:
    clock = FakeClock()
    faulty = FaultyKube(Recorder(), clock=clock)
    faulty.stall("get")
    call = asyncio.ensure_future(faulty.send(get("/api/v1/namespaces/a/serviceaccounts/b", timeout_s=5)))
    await clock.wait_for_sleepers(1)
    clock.advance(4.999)
    await settle()
    assert not call.done()
    clock.advance(0.001)
    with pytest.raises(TransportFailure, match="within 5s"):
        await call
    assert [a.status for a in faulty.answers] == [0]


async def test_watches_stream_real_lines_then_injected_ones_then_break() -> None:
    inner = Recorder()
    faulty = FaultyKube(inner, clock=FakeClock())
    async with faulty.open(get("/api/v1/pods?watch=true")) as stream:
        lines = aiter(stream.lines)
        inner.lines.put_nowait(b"real")
        assert await anext(lines) == b"real"
        assert faulty.watch_count == 1
        faulty.inject(b"injected")
        assert await anext(lines) == b"injected"
        faulty.break_watches()
        with pytest.raises(TransportFailure, match="reset"):
            await anext(lines)
    assert faulty.watch_count == 0


async def test_an_outage_refuses_every_call_until_restored() -> None:
    inner = Recorder()
    faulty = FaultyKube(inner, clock=FakeClock())
    faulty.outage("refuse")
    with pytest.raises(TransportFailure, match="refused"):
        await faulty.send(get("/api/v1/pods"))
    faulty.outage("error")
    assert (await faulty.send(get("/api/v1/pods"))).status == 503
    faulty.restore()
    assert (await faulty.send(get("/api/v1/pods"))).status == 200
    assert len(inner.sent) == 1


async def test_a_before_hook_runs_ahead_of_the_forwarded_call() -> None:
    inner = Recorder()
    faulty = FaultyKube(inner, clock=FakeClock())
    seen: list[int] = []

    async def hook() -> None:
        seen.append(len(inner.sent))

    faulty.before("node_patch", hook)
    await faulty.send(HttpRequest(method="PATCH", url=SERVER + "/api/v1/nodes/n", headers={}, body=b"[]",
                                  timeout_s=10))
    assert seen == [0] and len(inner.sent) == 1
