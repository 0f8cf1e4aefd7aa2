"""The background loop that keeps cached tokens fresh, so a request never waits on Google.

``token_refresher`` sleeps until the earliest refresh (or retry) point among its caches, starts the
due fetches (each cache makes them single-flight and records failures with backoff), and sleeps
again. A cache calls ``Refresher.wake`` when its schedule changes (a new key, a finished fetch), which
cuts the sleep short; ``stop`` ends the loop. Runs as one named task owned by the aiohttp app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from metaemu.clock import Clock

log = logging.getLogger(__name__)

#: With nothing scheduled the loop still wakes this often, as a safety net against a lost wake-up.
IDLE_WAKE_S = 60.0


class RefreshableCache(Protocol):
    kind: str

    def due(self) -> Sequence[Any]: ...
    def next_due(self) -> float | None: ...
    def refresh(self, key: Any) -> asyncio.Task[Any]: ...


class Refresher:
    def __init__(self, *, clock: Clock) -> None:
        self._clock = clock
        self._caches: list[RefreshableCache] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._planned_wake = float("inf")  # monotonic end of the current sleep (inf: not sleeping)

    def add(self, cache: RefreshableCache) -> None:
        self._caches.append(cache)
        self.wake()

    def remove(self, cache: RefreshableCache) -> None:
        """Stop refreshing ``cache`` (its identity is gone); unknown caches are ignored."""
        if cache in self._caches:
            self._caches.remove(cache)

    def wake(self, at: float | None = None) -> None:
        """A cache's schedule changed; ``at`` is the monotonic time its changed key next needs
        attention. Cut the sleep short only if that is earlier than the planned wake-up, so a
        burst of completed fetches (each scheduling its next refresh far ahead) costs no rescans."""
        if at is None or at < self._planned_wake:
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def token_refresher(self) -> None:
        """Run until ``stop``; never dies on an error from one iteration."""
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._start_due()
                delay = self._delay()
            except Exception:  # a bug in one iteration must not stop all refreshes
                log.exception("refresher iteration failed")
                delay = 1.0
            self._planned_wake = self._clock.monotonic() + delay
            await self._clock.sleep(delay, until=self._wake)
            self._planned_wake = float("inf")

    def _start_due(self) -> None:
        for cache in self._caches:
            for key in cache.due():
                cache.refresh(key)

    def _delay(self) -> float:
        times = [t for c in self._caches if (t := c.next_due()) is not None]
        if not times:
            return IDLE_WAKE_S
        return max(0.0, min(min(times) - self._clock.monotonic(), IDLE_WAKE_S))
