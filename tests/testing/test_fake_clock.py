"""FakeClock: virtual time that moves only on advance(), with sleeps an event can cut short."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from metaemu.clock import Clock
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock, settle


def test_starts_at_the_default_instant_and_monotonic_1000() -> None:
    clock = FakeClock()
    assert clock.now() == DEFAULT_START == dt.datetime(2026, 11, 22, 5, 0, tzinfo=dt.UTC)
    assert clock.monotonic() == 1000.0


def test_is_a_clock() -> None:
    clock: Clock = FakeClock()
    assert clock.now().tzinfo is not None


def test_advance_moves_wall_and_monotonic_time_together() -> None:
    clock = FakeClock()
    clock.advance(90.5)
    assert clock.now() == DEFAULT_START + dt.timedelta(seconds=90.5)
    assert clock.monotonic() == 1090.5


def test_rejects_a_naive_start_and_a_negative_advance() -> None:
    with pytest.raises(ValueError, match="aware"):
        FakeClock(start=dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match=">= 0"):
        FakeClock().advance(-1)


def test_set_wall_steps_wall_time_only() -> None:
    clock = FakeClock()
    clock.set_wall(DEFAULT_START - dt.timedelta(hours=1))
    assert clock.now() == DEFAULT_START - dt.timedelta(hours=1)
    assert clock.monotonic() == 1000.0


async def test_sleep_returns_only_once_advance_reaches_the_deadline() -> None:
    clock = FakeClock()
    sleeper = asyncio.create_task(clock.sleep(60))
    await clock.wait_for_sleepers(1)
    clock.advance(59)
    await settle()
    assert not sleeper.done()
    clock.advance(1)
    await settle()
    assert sleeper.done()
    assert sleeper.result() is False
    assert clock.pending_sleepers == 0


async def test_one_advance_wakes_every_sleeper_whose_deadline_passed() -> None:
    clock = FakeClock()
    short, long_ = asyncio.create_task(clock.sleep(10)), asyncio.create_task(clock.sleep(100))
    await clock.wait_for_sleepers(2)
    clock.advance(50)
    await settle()
    assert short.done()
    assert not long_.done()
    assert clock.pending_sleepers == 1
    clock.advance(50)
    await settle()
    assert long_.done()


async def test_event_cuts_a_sleep_short_and_returns_true() -> None:
    clock = FakeClock()
    stop = asyncio.Event()
    sleeper = asyncio.create_task(clock.sleep(3600, until=stop))
    await clock.wait_for_sleepers(1)
    stop.set()
    await settle()
    assert sleeper.result() is True
    assert clock.pending_sleepers == 0


async def test_an_already_set_event_returns_true_without_sleeping() -> None:
    clock = FakeClock()
    stop = asyncio.Event()
    stop.set()
    assert await clock.sleep(3600, until=stop) is True
    assert clock.pending_sleepers == 0


async def test_a_deadline_reached_with_an_unset_event_returns_false() -> None:
    clock = FakeClock()
    sleeper = asyncio.create_task(clock.sleep(5, until=asyncio.Event()))
    await clock.wait_for_sleepers(1)
    clock.advance(5)
    await settle()
    assert sleeper.result() is False


async def test_non_positive_sleep_only_yields() -> None:
    clock = FakeClock()
    assert await clock.sleep(0) is False
    assert await clock.sleep(-3, until=asyncio.Event()) is False
    assert clock.monotonic() == 1000.0


async def test_a_cancelled_sleeper_is_forgotten() -> None:
    clock = FakeClock()
    sleeper = asyncio.create_task(clock.sleep(60, until=asyncio.Event()))
    await clock.wait_for_sleepers(1)
    sleeper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeper
    assert clock.pending_sleepers == 0
    clock.advance(120)  # waking nobody must not fail


async def test_a_periodic_loop_fires_once_per_stepped_advance() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def loop() -> None:
        while True:
            await clock.sleep(10)
            ticks.append(clock.monotonic())

    task = asyncio.create_task(loop())
    for _ in range(3):
        await clock.wait_for_sleepers(1)
        clock.advance(10)
        await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ticks == [1010.0, 1020.0, 1030.0]


async def test_wait_for_sleepers_raises_instead_of_hanging() -> None:
    with pytest.raises(RuntimeError, match="expected 1 sleepers"):
        await FakeClock().wait_for_sleepers(1, rounds=5)
