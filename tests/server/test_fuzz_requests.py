"""Raw request bytes from a fuzzer against a running metaemu (issue #13): never a 500, never a
traceback in the log, never a token, ID token or email for a request the rules refuse.

Hypothesis builds requests from the shapes clients and attackers send (methods, targets in every
form, duplicated and conflicting headers, smuggling headers, bodies, bare LF line ends) and
mutates them byte by byte. The server runs in a thread with its own event loop so that the
examples can use plain blocking sockets. Derandomized, so a run is repeatable: every run tries the
same examples; ``HYPOTHESIS_PROFILE=explore`` tries fresh ones (more, with random seeds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from metaemu import eventloop
from metaemu.testing.world import SERVICE_ACCOUNT, World, build_world
from tests.helpers import running_server

settings.register_profile("ci", max_examples=1000, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("explore", max_examples=5000, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
#: A failing server must fail the example, not hang it: every socket operation is bounded.
SOCKET_TIMEOUT_S = 10.0


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Served:
    port: int
    world: World
    log: Captured = field(default_factory=Captured)

    def problems(self, since: int) -> list[str]:
        """Log records a request may never cause, from record ``since`` on: a traceback (at any
        level: aiohttp logs some at DEBUG), or anything at ERROR."""
        return [f"{r.name}: {r.getMessage()}" for r in self.log.records[since:]
                if r.exc_info or r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    world = build_world(Path(tmp_path_factory.mktemp("fuzz")))
    ready: list[int] = []
    started, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        async with running_server(world, profile="gke") as server:
            ready.append(server.metadata_address.port)
            started.set()
            while not stop.is_set():  # the loop must stay free for the server: wake rarely
                await asyncio.get_running_loop().run_in_executor(None, stop.wait, 1.0)

    thread = threading.Thread(target=eventloop.run, args=(serve(),), name="metaemu-under-fuzz")  # as `serve` runs
    thread.start()
    assert started.wait(30), "metaemu did not start"
    result = Served(port=ready[0], world=world)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)  # records below the root's level never reach a handler
    root.addHandler(result.log)
    try:
        yield result
    finally:
        root.removeHandler(result.log)
        root.setLevel(level)
        stop.set()
        thread.join(30)


# -- what the fuzzer sends -------------------------------------------------------------------------

TARGETS = [
    "/computeMetadata/v1/instance/service-accounts/default/token",
    "/computeMetadata/v1/instance/service-accounts/default/token?scopes=a,b",
    "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://x.example",
    "/computeMetadata/v1/instance/service-accounts/default/email",
    "/computeMetadata/v1/instance/service-accounts/default/",
    "/computeMetadata/v1/?recursive=true&alt=json",
    "/computeMetadata/v1/project/project-id",
    "/computeMetadata/v1/instance/attributes/cluster-name",
    "/", "*", "metadata.google.internal:80",
    "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token",
    "http://attacker.example/computeMetadata/v1/instance/service-accounts/default/token",
    "HTTP://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/email",
    "https://metadata/computeMetadata/v1/instance/service-accounts/default/token",
    "/computeMetadata/v1/instance/service-accounts/default/%74oken",
    "/computeMetadata/v1/instance/service-accounts\\default\\token",
    "/computeMetadata/v1/../v1/instance/service-accounts/default/token",
    "//computeMetadata//v1/instance/service-accounts/default/token",
]
HEADER_NAMES = ["Host", "Metadata-Flavor", "metadata-flavor", "X-Forwarded-For", "X-Google-Metadata-Request",
                "Content-Length", "Transfer-Encoding", "Connection", "Expect", "Upgrade", "Cookie", "X-Padding"]
HEADER_VALUES = ["Google", "google", "Google ", "", "metadata.google.internal", "169.254.169.254",
                 "attacker.example", "True", "0", "5", "-1", "chunked", "gzip, chunked", "close", "keep-alive",
                 "100-continue", "websocket", "h2c", "1.2.3.4", "\x00", "\u00e9t\u00e9", "a" * 300]

# Mostly well-formed, so the examples reach the handler's rules rather than the parser's; the
# byte mutations below and the random binaries cover the parser.
methods = st.sampled_from(["GET"] * 8 + ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "CONNECT", "TRACE", "PATCH",
                                        "PROPFIND", "get"])
targets = st.sampled_from(TARGETS) | st.builds(lambda t, s: t + s, st.sampled_from(TARGETS),
                                              st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                                                      max_size=20))
versions = st.sampled_from(["HTTP/1.1"] * 10 + ["HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/9.9"])
known_values = st.sampled_from(HEADER_VALUES)
header_values = st.one_of(known_values, known_values, known_values,
                          st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40))
headers = st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values), max_size=4)
GOOD_HEADERS = [("Host", "metadata.google.internal"), ("Metadata-Flavor", "Google")]
FOREIGN_HOST = [("Host", "attacker.example:80"), ("Metadata-Flavor", "Google")]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from(["\r\n"] * 5 + ["\n"]))
    base = draw(st.sampled_from([GOOD_HEADERS, GOOD_HEADERS[:1], GOOD_HEADERS, FOREIGN_HOST, GOOD_HEADERS[1:], []]))
    fields = [*base, *draw(headers)]
    fields = draw(st.permutations(fields))
    head = f"{draw(methods)} {draw(targets)} {draw(versions)}{eol}"
    head += "".join(f"{name}: {value}{eol}" for name, value in fields) + eol
    return head.encode("utf-8", "surrogateescape") + draw(st.sampled_from([b""] * 4) | st.binary(max_size=40))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(requests()))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at]
    return bytes(data)


# -- the oracle ------------------------------------------------------------------------------------

def send(port: int, data: bytes) -> bytes:
    """Send ``data``, end our side (so an incomplete request ends instead of waiting for the 10 s
    header deadline), and read everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def may_get_metadata(data: bytes) -> bool:
    """A necessary condition for any metadata in a response: a GET, the flavor header with Google
    and nothing else, no X-Forwarded-For, and no foreign name as the authority (the target's own
    when it is absolute-form, else Host). The server's rules are stricter; this only catches a
    response the rules could never allow."""
    lowered = data.lower()
    flavors = re.findall(rb"\nmetadata-flavor:[ \t]*([^\r\n]*?)[ \t]*\r?\n", lowered)
    target = [*lowered.split(b"\n", 1)[0].split(b" "), b"", b""][1]
    if target.startswith(b"http://"):
        foreign = target.startswith(b"http://attacker.example")
    else:
        foreign = any(b"attacker.example" in h for h in re.findall(rb"\nhost:([^\r\n]*)", lowered))
    return (data.startswith(b"GET ") and bool(flavors) and all(f == b"google" for f in flavors)
            and b"\nx-forwarded-for:" not in lowered and not foreign)


def check(served: Served, data: bytes) -> None:
    before = len(served.log.records)
    response = send(served.port, data)
    statuses = re.findall(rb"(?:^|\r\n\r\n|\n)HTTP/1\.[01] (\d{3}) ", response)
    event(f"first status {statuses[0].decode() if statuses else 'none'}")  # --hypothesis-show-statistics
    for status in statuses:
        assert not status.startswith(b"5") or status == b"503", (status, data)
    leaked = (b'"access_token"' in response or re.search(rb"\beyJ[\w-]+\.[\w-]+\.[\w-]+", response) is not None
              or SERVICE_ACCOUNT.encode() in response)
    if leaked:
        assert may_get_metadata(data), data
    problems = served.problems(before)
    assert not problems, (problems, data)


@settings(settings.get_profile(PROFILE))
@given(data=requests())
def test_fuzzed_requests_never_fail_the_server_or_leak_metadata(served: Served, data: bytes) -> None:
    check(served, data)


@settings(settings.get_profile(PROFILE))
@given(data=mutated() | st.binary(max_size=300))
def test_mutated_and_random_bytes_never_fail_the_server_or_leak_metadata(served: Served, data: bytes) -> None:
    check(served, data)


def test_the_server_still_serves_after_the_fuzzing(served: Served) -> None:
    response = send(served.port, b"GET /computeMetadata/v1/instance/service-accounts/default/email HTTP/1.1\r\n"
                    b"Host: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(SERVICE_ACCOUNT.encode())
