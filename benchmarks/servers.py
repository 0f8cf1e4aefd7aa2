"""The servers under load, each in its own process pinned to one core.

Owns the child-process entry points (metaemu with the in-process Google stand-in, the bare aiohttp
baseline on uvloop, Go's net/http baseline, the Google stand-in on a loopback socket) and
``ServerProcess``, which starts one, reads back what it bound and stops it. Children are started
with ``spawn`` so they share nothing with the benchmark process (no inherited event loop, no
copied heap).

Not owned here: load generation (``load.py``) or any measurement.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

#: Every child binds loopback only: the benchmark never listens on a routable address.
LOOPBACK = "127.0.0.1"
#: Start-up includes importing aiohttp, metaemu and cryptography in a fresh interpreter and, for
#: metaemu, the first STS + IAM exchange; a few seconds at most on a slow machine.
START_TIMEOUT_S = 30.0
#: How long a child gets to shut down gracefully after SIGTERM before it is killed.
STOP_TIMEOUT_S = 10.0
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
#: The ID token the benchmark asks for; metaemu caches it before it reports ready.
BENCH_AUDIENCE = "https://bench.example/aud"
IDENTITY_PATH = f"/computeMetadata/v1/instance/service-accounts/default/identity?audience={BENCH_AUDIENCE}"
EMAIL_PATH = "/computeMetadata/v1/instance/service-accounts/default/email"
ROOT = Path(__file__).resolve().parents[1]
GO_BASELINE_SRC = ROOT / "benchmarks" / "go_baseline"

ChildMain = Callable[..., None]


def pin_to_cpu(cpu: int | None) -> None:
    """Restrict the calling process to ``cpu`` (no-op for None)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


class ServerProcess:
    """A child process that reports one value (its address) on a pipe, then serves until SIGTERM."""

    def __init__(self, target: ChildMain, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._parent, child = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=target, args=(child, *args), daemon=True)
        self._child = child
        self.info: Any = None

    @property
    def pid(self) -> int:
        if self._process.pid is None:
            raise RuntimeError("the server process has not been started")
        return self._process.pid

    def start(self) -> Any:
        """Start the child; returns what it reported once serving. Raises RuntimeError on failure."""
        self._process.start()
        self._child.close()
        if not self._parent.poll(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"{self._process.name} did not start within {START_TIMEOUT_S:g}s")
        try:
            self.info = self._parent.recv()
        except EOFError:
            self._process.join(STOP_TIMEOUT_S)
            self.stop()
            raise RuntimeError(f"{self._process.name} exited during start-up "
                               f"(exit code {self._process.exitcode})") from None
        return self.info

    def stop(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(STOP_TIMEOUT_S)
        self._parent.close()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve_app(app: web.Application, conn: multiprocessing.connection.Connection,
                     info: Callable[[int], Any]) -> None:
    # access_log=None as metaemu's runner does: the comparison is of request handling, not logging.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        conn.send(info(int(runner.addresses[0][1])))
        await _until_sigterm()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- bare aiohttp baseline


Routes = dict[str, tuple[bytes, dict[str, str]]]  # request target -> (body, headers)


def baseline_app(routes: Routes) -> web.Application:
    """One handler answering each target with fixed bytes and headers: the floor for aiohttp."""
    frozen = {target: (body, dict(headers)) for target, (body, headers) in routes.items()}

    async def answer(request: web.Request) -> web.Response:
        found = frozen.get(request.path_qs)
        if found is None:
            raise web.HTTPNotFound()
        return web.Response(body=found[0], headers=found[1])

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    return app


def baseline_main(conn: multiprocessing.connection.Connection, cpu: int | None, routes: Routes) -> None:
    from metaemu import eventloop

    pin_to_cpu(cpu)
    eventloop.run(_serve_app(baseline_app(routes), conn, lambda port: (port, os.getpid())))


# ---------------------------------------------------------------- Go net/http baseline


def build_go_baseline(directory: Path) -> Path:
    """``go build`` of benchmarks/go_baseline (standard library only) into ``directory``."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    out = directory / "go_baseline"
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    subprocess.run([go, "build", "-o", str(out), "."], cwd=GO_BASELINE_SRC, env=env, check=True, timeout=300,
                   capture_output=True)
    return out


def go_main(conn: multiprocessing.connection.Connection, cpu: int | None, binary: str, routes: Routes) -> None:
    """Go's net/http on one core (GOMAXPROCS=1, pinned), answering ``routes``."""
    pin_to_cpu(cpu)
    spec = {target: {"body": base64.b64encode(body).decode(), "headers": headers}
            for target, (body, headers) in routes.items()}
    proc = subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "GOMAXPROCS": "1"})
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    port = int(proc.stdout.readline())
    conn.send((port, proc.pid))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(24 * 3600)
    proc.terminate()
    proc.wait(STOP_TIMEOUT_S)


# ---------------------------------------------------------------- metaemu, Google in process


def metaemu_main(conn: multiprocessing.connection.Connection, cpu: int | None) -> None:
    """metaemu on loopback; upstream calls go to the in-process stand-in (no sockets, no latency).
    On the loop ``metaemu serve`` runs on (uvloop where installed)."""
    from metaemu import eventloop

    pin_to_cpu(cpu)
    eventloop.run(_metaemu(conn))


async def _metaemu(conn: multiprocessing.connection.Connection) -> None:
    from metaemu.cache.credentials import IdTokenKey
    from metaemu.config import parse_config
    from metaemu.server.runner import MetaemuServer
    from metaemu.testing.world import build_world

    with tempfile.TemporaryDirectory(prefix="metaemu-bench-") as tmp:
        world = build_world(Path(tmp))
        raw = world.config(sts_url="http://sts.googleapis.test/v1/token", iam_url="http://iamcredentials.test/v1")
        config = parse_config(raw, hostname="bench", base_dir=Path(tmp))
        async with MetaemuServer(config, http=world.google.client()) as server:
            creds = server.components.credentials
            await creds.access.get(creds.default_scopes, wait_s=START_TIMEOUT_S)
            await creds.id_token(IdTokenKey(audience=BENCH_AUDIENCE, format="standard", licenses=False),
                                 wait_s=START_TIMEOUT_S)
            conn.send((server.metadata_address.port, os.getpid()))
            await _until_sigterm()


# ---------------------------------------------------------------- Google stand-in on a socket


def google_main(conn: multiprocessing.connection.Connection, cpu: int | None, directory: str) -> None:
    """Google STS + IAM stand-in on loopback for a ``metaemu serve`` subprocess.

    Reports the metaemu configuration (as parsed YAML, listen addresses still to fill in) that
    points at it; the projected token is written under ``directory``.
    """
    pin_to_cpu(cpu)
    from metaemu.testing.world import build_world

    world = build_world(Path(directory))

    def info(port: int) -> dict[str, Any]:
        base = f"http://{LOOPBACK}:{port}"
        return world.config(sts_url=f"{base}/v1/token", iam_url=f"{base}/v1")

    asyncio.run(_serve_app(world.google.app(), conn, info))


# ---------------------------------------------------------------- a blocking probe


def http_get(port: int, path: str, *, headers: Mapping[str, str],
             timeout_s: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    """One GET to ``127.0.0.1:port``: (status, headers, body). Raises OSError when nothing listens."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers=dict(headers))
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def metaemu_sidecar_on(host: str, port: int) -> None:
    """A sidecar-mode metaemu on ``host:port`` (the in-process Google stand-in), on the loop
    ``metaemu serve`` uses; prints READY once its token is cached, stops on SIGTERM. For
    benchmarks/node_load.py, which starts it inside the simulated node's namespace."""
    from metaemu import eventloop

    async def main() -> None:
        from metaemu.config import parse_config
        from metaemu.server.runner import MetaemuServer
        from metaemu.testing.world import build_world

        with tempfile.TemporaryDirectory(prefix="metaemu-bench-") as tmp:
            world = build_world(Path(tmp))
            raw = world.config(sts_url="http://sts.googleapis.test/v1/token", iam_url="http://iamcredentials.test/v1",
                               listen=f"{host}:{port}", admin_listen="127.0.0.1:0")
            config = parse_config(raw, hostname="bench", base_dir=Path(tmp))
            async with MetaemuServer(config, http=world.google.client()) as server:
                creds = server.components.credentials
                await creds.access.get(creds.default_scopes, wait_s=START_TIMEOUT_S)
                print("READY", flush=True)
                await _until_sigterm()

    eventloop.run(main())
