"""A ``Clock`` that moves only when a test says so.

``FakeClock`` owns virtual wall time and virtual monotonic time and the set of coroutines sleeping
on them. ``advance()`` moves both and wakes every sleeper whose deadline has passed; nothing here
reads real time, so a test of a one-hour refresh loop runs in microseconds.

A woken sleeper runs only when the event loop next gets control, so tests yield after advancing::

    clock.advance(60)
    await settle()            # let the woken tasks run to their next await

``advance()`` is one jump, like ``trio.testing.MockClock.jump``: a loop sleeping 10 s repeatedly
wakes once per ``advance(100)``, and its next sleep is measured from the new time. Advance in steps
(with a ``settle()`` after each) to fire a periodic loop several times.

Not owned here: the real clock (``metaemu.clock.SystemClock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

#: Default start of virtual wall time: a fixed, whole-second instant so expiry timestamps in
#: assertions are stable (the date of the upstream.md examples).
DEFAULT_START = dt.datetime(2026, 11, 22, 5, 0, 0, tzinfo=dt.UTC)
#: Default start of virtual monotonic time; non-zero so code that treats 0 as "never" is caught.
DEFAULT_MONOTONIC_START = 1000.0
#: Loop iterations ``settle()`` yields by default. A wake-up crosses a few futures and tasks
#: (sleeper future -> asyncio.wait -> task -> caller); 20 covers chains several tasks deep.
DEFAULT_SETTLE_ROUNDS = 20


async def settle(rounds: int = DEFAULT_SETTLE_ROUNDS) -> None:
    """Yield to the event loop ``rounds`` times so tasks woken by ``advance()`` can run.

    Uses ``asyncio.sleep(0)``, which yields without reading or waiting on real time.
    """
    for _ in range(rounds):
        await asyncio.sleep(0)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sleeper:
    deadline: float
    woken: asyncio.Future[None] = field(repr=False)


class FakeClock:
    """Virtual time implementing ``metaemu.clock.Clock``.

    Single event loop only; not thread-safe (tests drive it from the loop that sleeps on it).
    """

    def __init__(self, *, start: dt.datetime = DEFAULT_START,
                 monotonic_start: float = DEFAULT_MONOTONIC_START) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock start must be an aware datetime")
        self._wall = start.astimezone(dt.UTC)
        self._monotonic = monotonic_start
        self._sleepers: list[_Sleeper] = []

    def now(self) -> dt.datetime:
        return self._wall

    def time(self) -> float:
        return self.now().timestamp()

    def monotonic(self) -> float:
        return self._monotonic

    @property
    def pending_sleepers(self) -> int:
        """Coroutines currently blocked in ``sleep()`` and not yet woken."""
        return sum(1 for s in self._sleepers if not s.woken.done())

    def advance(self, seconds: float) -> None:
        """Move wall and monotonic time forward and wake sleepers whose deadline has passed.

        Raises ``ValueError`` for negative ``seconds`` (monotonic time never goes back; use
        ``set_wall`` to model a wall-clock step).
        """
        if seconds < 0:
            raise ValueError("FakeClock.advance: seconds must be >= 0")
        self._monotonic += seconds
        self._wall += dt.timedelta(seconds=seconds)
        for sleeper in self._sleepers:
            if sleeper.deadline <= self._monotonic and not sleeper.woken.done():
                sleeper.woken.set_result(None)

    def set_wall(self, now: dt.datetime) -> None:
        """Step wall time (NTP correction, skew) without moving monotonic time or waking anyone."""
        if now.tzinfo is None:
            raise ValueError("FakeClock.set_wall needs an aware datetime")
        self._wall = now.astimezone(dt.UTC)

    async def sleep(self, seconds: float, *, until: asyncio.Event | None = None) -> bool:
        """Block until ``advance()`` reaches ``seconds`` from now, or ``until`` is set.

        Returns True when ``until`` is set on return (it cut the sleep short), like
        ``SystemClock.sleep``. A non-positive ``seconds`` only yields once.
        """
        if until is not None and until.is_set():
            return True
        if seconds <= 0:
            await asyncio.sleep(0)
            return until is not None and until.is_set()
        sleeper = _Sleeper(deadline=self._monotonic + seconds,
                           woken=asyncio.get_running_loop().create_future())
        self._sleepers.append(sleeper)
        try:
            if until is None:
                await sleeper.woken
                return False
            await _first_of(sleeper.woken, until)
            return until.is_set()
        finally:
            self._sleepers.remove(sleeper)

    async def wait_for_sleepers(self, count: int, *, rounds: int = 200) -> None:
        """Yield until at least ``count`` coroutines sleep on this clock.

        Lets a test wait for a background loop to reach its sleep before advancing. Raises
        ``RuntimeError`` after ``rounds`` loop iterations (a hang would otherwise be silent).
        """
        for _ in range(rounds):
            if self.pending_sleepers >= count:
                return
            await asyncio.sleep(0)
        raise RuntimeError(f"expected {count} sleepers on FakeClock, have {self.pending_sleepers}")


async def _first_of(woken: asyncio.Future[None], event: asyncio.Event) -> None:
    """Return when ``woken`` completes or ``event`` is set; cancels its helper task either way."""
    event_waiter = asyncio.ensure_future(event.wait())
    waiters: set[asyncio.Future[Any]] = {woken, event_waiter}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        event_waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await event_waiter
