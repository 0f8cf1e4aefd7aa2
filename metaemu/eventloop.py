"""The event loop metaemu runs on: uvloop where it is installed (a dependency on Linux and macOS;
about twice the throughput of asyncio's own loop for the metadata listener, benchmarks/), else
asyncio's. Nothing in metaemu depends on which: both run the same protocols and transports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (asyncio's default) where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:  # Windows, PyPy, or a build without it: the standard loop
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the loop of ``loop_factory``."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the running loop's implementation (for the ``serving`` log line)."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
