"""Time, behind one protocol so refresh and cache logic can be tested without sleeping.

``Clock`` gives aware-UTC wall time (for expiry timestamps from upstream), monotonic time (for
scheduling) and a sleep that an ``asyncio.Event`` can cut short (so shutdown never waits out a
refresh interval). ``SystemClock`` is the real one; tests use ``metaemu.testing.fake_clock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """Aware UTC wall-clock time."""

    def time(self) -> float:
        """``now()`` as a Unix timestamp (cheaper, for the request hot path)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    async def sleep(self, seconds: float, *, until: asyncio.Event | None = None) -> bool:
        """Sleep ``seconds`` or until ``until`` is set; True when the event cut it short."""


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float, *, until: asyncio.Event | None = None) -> bool:
        if until is None:
            await asyncio.sleep(max(0.0, seconds))
            return False
        if until.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), timeout=max(0.0, seconds))
        return until.is_set()
