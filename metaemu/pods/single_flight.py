"""``SingleFlight``: at most one in-flight call per key, its outcome shared by every caller.

Used for API lookups on the request path (live pod lookups, service-account reads) so that a burst
of requests costs one API call, not one each. The call runs in its own named task and callers await
it through ``asyncio.shield``: a caller that gives up (client disconnect, deadline) neither cancels
the lookup for the others nor leaves the key stuck. Calls must bound their own duration (they all
go through ``HttpClient`` deadlines); ``aclose`` cancels what is left at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        """Calls in flight."""
        return len(self._tasks)

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """The result of the in-flight call for ``key``, starting ``call()`` when there is none."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(_awaited(call), name=f"{self._name} (single flight)")
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        """Cancel and await every call still in flight."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved here so a call nobody awaited any more is not reported


async def _awaited(call: Callable[[], Awaitable[V]]) -> V:
    return await call()
