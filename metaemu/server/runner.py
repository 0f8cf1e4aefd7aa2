"""Running metaemu: bind both listeners, serve, and shut down gracefully.

``MetaemuServer`` is used by ``metaemu serve``, ``metaemu demo`` and the functional tests (which
pass port 0 and read the bound ports back). On stop: long polls are released, listeners close (no
new connections), in-flight requests finish (up to ``SHUTDOWN_GRACE_S``), then the refresher and the
upstream client stop.

Node mode hands the node over without a failed request (issue #11). Both listeners are shared
(``metaemu.server.reuseport``: SO_REUSEPORT, new connections steered to the newer agent). An agent
that finds its metadata address already answering is a successor: it syncs its pod watch and warms
every pod's credentials (``ContextProvider.warm``) before it listens, and from the moment it
listens every new connection is its own. On SIGTERM (``serve_until_signalled``) the old agent
drains for ``DRAIN_S``: still accepting (what was queued on its socket is served, never reset),
long polls released, every response with ``Connection: close`` so keep-alive clients reconnect to
the successor; then it stops as above. An agent that finds nothing answering (first start, a crash)
listens at once: pods' requests wait for the watch and the exchange rather than being refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import cast

from aiohttp import web
from aiohttp.web_request import BaseRequest

from metaemu.clock import Clock, SystemClock
from metaemu.config import Config, HostPort
from metaemu.eventloop import loop_name
from metaemu.metrics import Metrics, create_metrics
from metaemu.pods.stream import KubeHttp, KubeTransport
from metaemu.server.app import Components, build_components, create_metadata_app
from metaemu.server.deadline import HeaderDeadline
from metaemu.server.fast_path import FastPathProtocol
from metaemu.server.health import create_admin_app
from metaemu.server.protocol import MetadataRequestHandler
from metaemu.server.reuseport import shared_listener
from metaemu.transport import AiohttpClient, HttpClient

log = logging.getLogger(__name__)

#: Token requests are answered from memory in microseconds; 10 s is ample for in-flight requests
#: and well inside Kubernetes' default 30 s termination grace period.
SHUTDOWN_GRACE_S = 10.0
#: Idle keep-alive connections are closed after this (aiohttp's default is 75 s); clients reconnect
#: cheaply on loopback or the node, and idle sockets are capacity (security.md recommendation 7).
IDLE_TIMEOUT_S = 30.0
#: Node mode's drain on SIGTERM: a keep-alive client making a request a second gets its
#: ``Connection: close`` within it; handshakes in flight when the successor started listening
#: complete in microseconds on the node. Well inside the DaemonSet's 30 s grace period.
DRAIN_S = 2.0
#: How long a successor may spend warming before it takes connections anyway: one exchange's three
#: upstream calls at the default endpoints timeout (10 s each).
WARM_TIMEOUT_S = 30.0
#: Whether another agent answers on the metadata address: a local connect, refused at once if not.
PREDECESSOR_PROBE_S = 1.0


class StartupError(Exception):
    """A listener could not be bound (SEC-38: fail fast, never fall back silently)."""


class MetaemuServer:
    def __init__(self, config: Config, *, clock: Clock | None = None, http: HttpClient | None = None,
                 metrics: Metrics | None = None,
                 kube_transport: Callable[[KubeHttp], KubeTransport] | None = None) -> None:
        self.config = config
        self._own_http: AiohttpClient | None = None
        if http is None:
            http = self._own_http = AiohttpClient()
        self.metrics = metrics or create_metrics()
        self._clock = clock or SystemClock()
        self.components: Components = build_components(
            config=config, clock=self._clock, metrics=self.metrics, http=http,
            kube_transport=kube_transport)
        self._runners: list[web.AppRunner] = []
        self._listeners: list[asyncio.Server] = []
        self._fast_connections: set[FastPathProtocol] = set()
        self._metadata_connection: Callable[[], asyncio.Protocol] | None = None
        self._full_metadata_connection: Callable[[], asyncio.Protocol] | None = None
        self._unix_paths: list[Path] = []
        self._draining = False
        self._listening = False  # the metadata listener (a successor's readiness waits for it)
        self.metadata_address: HostPort = config.listen
        self.admin_address: HostPort = config.admin_listen

    @property
    def metadata_url(self) -> str:
        a = self.metadata_address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(a.host, a.host)
        return f"http://{HostPort(host=host, port=a.port)}"

    @property
    def admin_url(self) -> str:
        a = self.admin_address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(a.host, a.host)
        return f"http://{HostPort(host=host, port=a.port)}"

    async def start(self) -> None:
        metadata = create_metadata_app(self.components)
        admin = create_admin_app(metrics=self.metrics, ready=self._ready,
                                 metadata_url=lambda: self.metadata_url + "/")
        protocol = partial(MetadataRequestHandler, responder=self.components.handler.responder, metrics=self.metrics)
        shared = self.config.mode == "node"
        metadata_factory = await self._setup(metadata, protocol=protocol)  # starts the refresher, the pod watch
        admin_factory = await self._setup(admin)
        self.admin_address = await self._listen(admin_factory, self.config.admin_listen, "admin_listen", shared=shared)
        if self.config.admin_socket is not None:
            await self._listen_unix(admin_factory, self.config.admin_socket)
        if shared and self.config.listen.port != 0 and await _answers(self.metadata_url):
            log.info("another agent serves the metadata address: warming before taking connections",
                     extra={"listen": str(self.config.listen)})
            try:
                await asyncio.wait_for(self.components.contexts.warm(), WARM_TIMEOUT_S)
            except TimeoutError:
                log.warning("still warming after %s s: taking connections anyway", WARM_TIMEOUT_S)
        self.metadata_address = await self._listen(metadata_factory, self.config.listen, "listen", shared=shared)
        self._listening = True
        log.info("serving", extra={"listen": str(self.metadata_address), "admin_listen": str(self.admin_address),
                                   "profile": self.config.profile, "mode": self.config.mode, "event_loop": loop_name(),
                                   "email": self._served_email()})

    def _served_email(self) -> str | None:
        """Sidecar mode's account: the impersonated one, which a credentials file may name (#14)."""
        if self.config.mode != "sidecar":
            return None
        return self.components.credentials.service_account or self.config.email

    def _ready(self) -> str | None:
        # Not before our own listener exists: the self-probe would reach the agent we replace.
        if not self._listening:
            return "warming: the metadata listener is not open yet"
        return "draining: stopping" if self._draining else self.components.contexts.ready()

    async def _setup(self, app: web.Application, *,
                     protocol: Callable[..., MetadataRequestHandler] | None = None) -> Callable[[], asyncio.Protocol]:
        """Start ``app`` (its cleanup_ctx tasks) and return the factory of its connections' protocols."""
        # handler_cancellation: a request whose client has gone is cancelled, as Go's net/http
        # cancels its context; so a departed long poll frees its slot at once (issue #13). Token
        # fetches are never cancelled with it: waiters only watch them (token_cache, single_flight).
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S,
                               keepalive_timeout=IDLE_TIMEOUT_S, handler_cancellation=True)
        await runner.setup()
        self._runners.append(runner)
        server = runner.server
        assert server is not None
        if protocol is not None:  # the metadata listener: every request to the handler (create_metadata_app)
            # The request factory is the application's, so every request is a web.Request.
            server.request_handler = cast(Callable[[BaseRequest], Awaitable[web.StreamResponse]],
                                          self.components.handler.__call__)
        loop = asyncio.get_running_loop()
        handler_factory: Callable[[], asyncio.Protocol] = server if protocol is None else partial(
            protocol, server, loop=loop, keepalive_timeout=IDLE_TIMEOUT_S, access_log=None)

        def full_connection() -> asyncio.Protocol:
            return HeaderDeadline(handler_factory())
        fast = self.components.fast if protocol is not None else None
        connection_factory: Callable[[], asyncio.Protocol] = full_connection
        if fast is not None and fast.enabled:
            # Each connection starts on the fast path, which hands it to aiohttp at the first doubt.
            connection_factory = partial(FastPathProtocol, answers=fast, full=handler_factory,
                                         open_connections=self._fast_connections, idle_timeout_s=IDLE_TIMEOUT_S)
        if protocol is not None:
            self._metadata_connection = connection_factory
            self._full_metadata_connection = full_connection
        return connection_factory

    async def _listen(self, factory: Callable[[], asyncio.Protocol], address: HostPort, key: str, *,
                      shared: bool) -> HostPort:
        loop = asyncio.get_running_loop()
        try:
            # Not TCPSite: each connection's protocol is wrapped in a read-header deadline (SEC-24).
            if shared:
                listener = await loop.create_server(factory, sock=shared_listener(address.host, address.port))
            else:
                listener = await loop.create_server(factory, address.host, address.port, reuse_address=True)
        except OSError as exc:
            await self.stop()
            raise StartupError(f"{key}: cannot listen on {address}: {exc.strerror or exc}") from exc
        self._listeners.append(listener)
        return HostPort(host=address.host, port=int(listener.sockets[0].getsockname()[1]))

    async def _listen_unix(self, factory: Callable[[], asyncio.Protocol], path: Path) -> None:
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):  # a previous run's: nothing listens on it now
                    os.unlink(path)
            listener = await loop.create_unix_server(factory, str(path))
            os.chmod(path, 0o660)  # the probes run as this user; nobody else needs /metrics here
        except OSError as exc:
            await self.stop()
            raise StartupError(f"admin_socket: cannot listen on {path}: {exc.strerror or exc}") from exc
        self._listeners.append(listener)
        self._unix_paths.append(path)

    def metadata_connection(self, *, fast_path: bool = True) -> asyncio.Protocol:
        """A new protocol for one metadata connection, as the listener makes for each one it
        accepts; with ``fast_path=False``, the full path's alone (the differential tests drive both
        over the same components). Only after ``start``."""
        factory = self._metadata_connection if fast_path else self._full_metadata_connection
        if factory is None:
            raise RuntimeError("the metadata listener is not started")
        return factory()

    async def drain(self) -> None:
        """Node mode's first step on SIGTERM (see the module docstring): ``DRAIN_S`` of serving
        with long polls released and every connection closed after its next response."""
        self._draining = True
        self.components.handler.shutdown.set()
        if self.components.fast is not None:
            self.components.fast.closing = True
        # Idle keep-alive connections stay open until the end: closing one now would race the
        # request its client may be sending on it; its next request gets Connection: close instead.
        await self._clock.sleep(DRAIN_S)

    async def stop(self) -> None:
        self.components.handler.shutdown.set()
        for listener in self._listeners:  # stop accepting first; in-flight requests finish below
            listener.close()
        for connection in list(self._fast_connections):  # idle by construction: nothing in flight
            connection.close_idle()
        for runner in reversed(self._runners):
            await runner.cleanup()  # finishes in-flight requests, then closes every connection
        for listener in self._listeners:
            await listener.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._listeners.clear()
        self._runners.clear()
        self._unix_paths.clear()
        if self._own_http is not None:
            await self._own_http.close()

    async def __aenter__(self) -> MetaemuServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


async def serve_until_signalled(server: MetaemuServer, *, started: Callable[[], None] | None = None) -> None:
    """Start ``server``, call ``started``, wait for SIGTERM or SIGINT, stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    freeze_startup_heap()
    if started is not None:
        started()
    try:
        await stop.wait()
        if server.config.mode == "node":
            log.info("draining: handing connections over", extra={"drain_s": DRAIN_S})
            await server.drain()
        log.info("stopping: finishing in-flight requests")
    finally:
        await server.stop()
        log.info("stopped")


async def _answers(url: str) -> bool:
    """Whether something accepts connections at ``url``'s address (a local one: refused at once
    when nothing listens; no answer within the probe's time counts as someone there)."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), PREDECESSOR_PROBE_S)
    except TimeoutError:
        return True
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def freeze_startup_heap() -> None:
    """Collect once, then exempt what survived from every later collection (``gc.freeze``).

    What start-up allocates (modules, the configuration, the apps, the pod index) lives as long as
    the process, yet each full collection walks all of it: the agent's first one took 17-33 ms on
    the benchmark machine and stalled whatever request was in flight (benchmarks/first_request.py,
    issue #11); after a freeze it takes about 2.5 ms. Called by the process's entry point, not by
    ``MetaemuServer.start``: the in-process tests must not freeze the test runner's heap.
    """
    gc.collect()
    gc.freeze()
