"""The list + watch loop every node-mode watcher runs, as client-go's reflector does.

``Reflector.run`` (one named task owned by the app): list (``_list``, which applies what it read
and returns the resourceVersion to watch from) → watch from it with bookmarks, applying each event
(``_apply``) → reconnect from the last resourceVersion seen; relist on 410 Gone; back off on
errors and on watches that make no progress. During an API outage the watcher's state stays as it
was (SEC-36). ``_watch_opened`` / ``_watch_closed`` tell a subclass when its events are live.

Not owned here: what is listed and watched, and what an event means (``watch``, ``service_accounts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Generic, TypeVar

from prometheus_client import Counter

from metaemu.clock import Clock
from metaemu.errors import UpstreamError
from metaemu.pods.kube_client import WatchEvent
from metaemu.pods.objects import PodRecord, ServiceAccountRecord

log = logging.getLogger(__name__)

#: Server-side watch duration. client-go's reflector picks 5 to 10 min; 5 min bounds how long a
#: silently broken connection (no RST through a NAT) can hide, at one reconnect per 5 min per node.
WATCH_TIMEOUT_S = 300
#: A watch still open this long after its timeoutSeconds is treated as stalled and dropped.
WATCH_GRACE_S = 30.0
#: A watch that ends sooner than this without delivering an event made no progress: back off
#: instead of reconnecting in a tight loop (a proxy closing every stream at once).
MIN_HEALTHY_WATCH_S = 1.0
#: Reconnect backoff, doubling from 1 s to 30 s (client-go's reflector: 800 ms to 30 s).
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0

T = TypeVar("T", PodRecord, ServiceAccountRecord)


class Reflector(Generic[T]):
    """Subclasses implement ``_list``, ``_events`` and ``_apply``. One event loop."""

    #: For logs and the stall error: "pod watch", "service-account watch".
    name = "watch"

    def __init__(self, *, clock: Clock, restarts: Counter) -> None:
        self._clock = clock
        self._restarts = restarts  # labels: expired (410 Gone, relist) | error
        self._resource_version = ""
        self._need_list = True
        self._progressed = False
        self._stop = asyncio.Event()
        self._watch_done: asyncio.Event | None = None

    @property
    def resource_version(self) -> str:
        return self._resource_version

    def stop(self) -> None:
        self._stop.set()
        if self._watch_done is not None:
            self._watch_done.set()

    # -- what a subclass provides ------------------------------------------------------------------

    async def _list(self) -> str:
        """List, apply the result, and return the resourceVersion to watch from."""
        raise NotImplementedError

    def _events(self, resource_version: str, timeout_s: int,
                opened: Callable[[], None]) -> AsyncGenerator[WatchEvent[T], None]:
        """The watch from ``resource_version``; it calls ``opened`` once the server accepted it."""
        raise NotImplementedError

    def _apply(self, event_type: str, item: T) -> None:
        """An ADDED, MODIFIED or DELETED event's object."""
        raise NotImplementedError

    def _watch_opened(self) -> None:
        """The server accepted a watch from a resourceVersion with no gap behind it: every change
        from here on arrives as an event."""

    def _watch_closed(self) -> None:
        """An opened watch ended (any way); events may be missed until the next one opens."""

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until ``stop`` (or cancellation); an iteration's failure is logged, counted and
        retried with backoff, never fatal."""
        failures = 0
        while not self._stop.is_set():
            self._progressed = False
            relisting, expired = self._need_list, False
            try:
                await self._cycle()
            except UpstreamError as exc:
                expired = exc.status == 410
                self._note_failure(exc)
            except Exception:  # a bug in one iteration must not stop the state from updating
                log.exception("%s iteration failed", self.name)
                self._restarts.labels("error").inc()
            if self._progressed or (expired and not relisting):
                failures = 0  # a healthy watch ended, or its history expired: go again at once
                continue
            failures += 1
            if not self._stop.is_set():
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (failures - 1))
                await self._clock.sleep(delay, until=self._stop)

    async def _cycle(self) -> None:
        if self._need_list:
            self._resource_version = await self._list()
            self._need_list = False
        started = self._clock.monotonic()
        try:
            await self._watch_once()
        finally:
            if self._clock.monotonic() - started >= MIN_HEALTHY_WATCH_S:
                self._progressed = True

    async def _watch_once(self) -> None:
        """One watch request, bounded on the injected clock so a stalled stream is noticed."""
        done = self._watch_done = asyncio.Event()
        task = asyncio.create_task(self._consume(), name=f"{self.name.replace(' ', '_')}_stream")
        task.add_done_callback(lambda _: done.set())
        try:
            if not await self._clock.sleep(WATCH_TIMEOUT_S + WATCH_GRACE_S, until=done):
                raise UpstreamError(service="k8s", url=self.name, status=0, body="stalled", retryable=True,
                                    message=f"the {self.name} stayed open past {WATCH_TIMEOUT_S}s")
            if task.done():  # else stop() ended the wait
                task.result()
        finally:
            self._watch_done = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _consume(self) -> None:
        opened = False

        def on_open() -> None:
            nonlocal opened
            opened = True
            self._watch_opened()

        events = self._events(self._resource_version, WATCH_TIMEOUT_S, on_open)
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    self._progressed = True
                    if event.resource_version:
                        self._resource_version = event.resource_version
                    if event.type in ("ADDED", "MODIFIED", "DELETED") and event.item is not None:
                        self._apply(event.type, event.item)
                    elif event.type != "BOOKMARK":
                        log.warning("ignoring %s event of type %r", self.name, event.type)
        finally:
            if opened:
                self._watch_closed()

    def _note_failure(self, exc: UpstreamError) -> None:
        if exc.status == 410:  # our resourceVersion left the server's history: start over
            self._need_list = True
            self._restarts.labels("expired").inc()
            log.info("%s expired (410 Gone); relisting", self.name)
            return
        self._restarts.labels("error").inc()
        log.warning("%s failed (%s); keeping the last known state", self.name, exc.reason)
