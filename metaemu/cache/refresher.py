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

    def add(self, cache: RefreshableCache) -> None:
        self._caches.append(cache)
        self.wake()

    def wake(self) -> None:
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
            await self._clock.sleep(delay, until=self._wake)

    def _start_due(self) -> None:
        for cache in self._caches:
            for key in cache.due():
                cache.refresh(key)

    def _delay(self) -> float:
        times = [t for c in self._caches if (t := c.next_due()) is not None]
        if not times:
            return IDLE_WAKE_S
        return max(0.0, min(min(times) - self._clock.monotonic(), IDLE_WAKE_S))
