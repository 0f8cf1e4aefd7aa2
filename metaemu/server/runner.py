"""Running metaemu: bind both listeners, serve, and shut down gracefully.

``MetaemuServer`` is used by ``metaemu serve``, ``metaemu demo`` and the functional tests (which
pass port 0 and read the bound ports back). On stop: long polls are released, listeners close (no
new connections), in-flight requests finish (up to ``SHUTDOWN_GRACE_S``), then the refresher and the
upstream client stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial
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
from metaemu.transport import AiohttpClient, HttpClient

log = logging.getLogger(__name__)

#: Token requests are answered from memory in microseconds; 10 s is ample for in-flight requests
#: and well inside Kubernetes' default 30 s termination grace period.
SHUTDOWN_GRACE_S = 10.0
#: Idle keep-alive connections are closed after this (aiohttp's default is 75 s); clients reconnect
#: cheaply on loopback or the node, and idle sockets are capacity (security.md recommendation 7).
IDLE_TIMEOUT_S = 30.0


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
        self.components: Components = build_components(
            config=config, clock=clock or SystemClock(), metrics=self.metrics, http=http,
            kube_transport=kube_transport)
        self._runners: list[web.AppRunner] = []
        self._listeners: list[asyncio.Server] = []
        self._fast_connections: set[FastPathProtocol] = set()
        self._metadata_connection: Callable[[], asyncio.Protocol] | None = None
        self._full_metadata_connection: Callable[[], asyncio.Protocol] | None = None
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
        admin = create_admin_app(metrics=self.metrics, ready=self.components.contexts.ready,
                                 metadata_url=lambda: self.metadata_url + "/")
        protocol = partial(MetadataRequestHandler, responder=self.components.handler.responder, metrics=self.metrics)
        self.metadata_address = await self._bind(metadata, self.config.listen, "listen", protocol=protocol)
        self.admin_address = await self._bind(admin, self.config.admin_listen, "admin_listen")
        log.info("serving", extra={"listen": str(self.metadata_address), "admin_listen": str(self.admin_address),
                                   "profile": self.config.profile, "mode": self.config.mode, "event_loop": loop_name(),
                                   "email": self.config.email if self.config.mode == "sidecar" else None})

    async def _bind(self, app: web.Application, address: HostPort, key: str, *,
                    protocol: Callable[..., MetadataRequestHandler] | None = None) -> HostPort:
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
        fast = self.components.fast if protocol is not None else None
        connection_factory: Callable[[], asyncio.Protocol]
        if fast is not None and fast.enabled:
            # Each connection starts on the fast path, which hands it to aiohttp at the first doubt.
            connection_factory = partial(FastPathProtocol, answers=fast, full=handler_factory,
                                         open_connections=self._fast_connections, idle_timeout_s=IDLE_TIMEOUT_S)
        else:
            def connection_factory() -> asyncio.Protocol:
                return HeaderDeadline(handler_factory())
        if protocol is not None:
            self._metadata_connection = connection_factory

            def full_connection() -> asyncio.Protocol:
                return HeaderDeadline(handler_factory())
            self._full_metadata_connection = full_connection
        try:
            # Not TCPSite: each connection's protocol is wrapped in a read-header deadline (SEC-24).
            listener = await loop.create_server(connection_factory, address.host, address.port, reuse_address=True)
        except OSError as exc:
            await self.stop()
            raise StartupError(f"{key}: cannot listen on {address}: {exc.strerror or exc}") from exc
        self._listeners.append(listener)
        return HostPort(host=address.host, port=int(listener.sockets[0].getsockname()[1]))

    def metadata_connection(self, *, fast_path: bool = True) -> asyncio.Protocol:
        """A new protocol for one metadata connection, as the listener makes for each one it
        accepts; with ``fast_path=False``, the full path's alone (the differential tests drive both
        over the same components). Only after ``start``."""
        factory = self._metadata_connection if fast_path else self._full_metadata_connection
        if factory is None:
            raise RuntimeError("the metadata listener is not started")
        return factory()

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
        self._listeners.clear()
        self._runners.clear()
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
    if started is not None:
        started()
    try:
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        await server.stop()
        log.info("stopped")
