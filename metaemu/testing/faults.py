"""Scripted misbehaviour for stand-ins: queued error answers and stalls, per backend.

A stand-in calls ``intercept(backend)`` after recording a request and before its real logic: a
stall blocks there until its event is set, then a queued fault (if any) answers instead of the
real logic. Backends are plain names (``"sts"``, ``"iam"``) so every fake can share this.

Not owned here: what a realistic error looks like for a given service (the stand-in supplies
the response).
"""

from __future__ import annotations

import asyncio
from collections import deque

from metaemu.transport import HttpResponse

#: A 200 that is not JSON: what a captive portal or misrouted proxy hands back.
GARBAGE_BODY = b"<!DOCTYPE html><html><head><title>Welcome</title></head><body>not JSON</body></html>"


def garbage_response() -> HttpResponse:
    return HttpResponse(status=200, headers={"Content-Type": "text/html; charset=UTF-8"}, body=GARBAGE_BODY)


class FaultInjector:
    """Per-backend queues of canned responses and stall events. One event loop; not thread-safe."""

    def __init__(self) -> None:
        self._queued: dict[str, deque[HttpResponse]] = {}
        self._stalls: dict[str, asyncio.Event] = {}

    def queue(self, backend: str, response: HttpResponse, *, times: int = 1) -> None:
        """Answer the next ``times`` calls to ``backend`` with ``response`` (after earlier faults)."""
        if times < 1:
            raise ValueError("times must be >= 1")
        self._queued.setdefault(backend, deque()).extend([response] * times)

    def pending(self, backend: str) -> int:
        """Queued faults not yet consumed."""
        return len(self._queued.get(backend, ()))

    def stall(self, backend: str) -> asyncio.Event:
        """Block calls to ``backend`` until the returned event is set (or ``unstall``).

        Calling it again while stalled returns the same event.
        """
        event = self._stalls.get(backend)
        if event is None or event.is_set():
            event = self._stalls[backend] = asyncio.Event()
        return event

    def unstall(self, backend: str) -> None:
        """Release every call blocked on ``backend`` and stop stalling new ones."""
        event = self._stalls.pop(backend, None)
        if event is not None:
            event.set()

    def clear(self) -> None:
        """Drop queued faults and release all stalls."""
        self._queued.clear()
        for backend in list(self._stalls):
            self.unstall(backend)

    async def intercept(self, backend: str) -> HttpResponse | None:
        """Wait out a stall, then pop the next queued fault; None lets the real logic answer."""
        event = self._stalls.get(backend)
        if event is not None:
            await event.wait()
        queue = self._queued.get(backend)
        return queue.popleft() if queue else None
