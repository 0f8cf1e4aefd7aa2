"""The serving process freezes its start-up heap once it has started (issue #11: the first full
garbage collection otherwise walks all of it and stalls a request; benchmarks/first_request.py).
Run in a child process: freezing the test runner's own heap would change every later test."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import asyncio, gc, os, signal
from metaemu.server import runner

class Server:  # what serve_until_signalled uses of a MetaemuServer
    class config:
        mode = "sidecar"
    async def start(self):
        print("before", gc.get_freeze_count(), flush=True)
    async def stop(self):
        pass

def started():
    print("after", gc.get_freeze_count(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

asyncio.run(runner.serve_until_signalled(Server(), started=started))
"""


def test_the_heap_is_frozen_after_start_and_before_the_first_request() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    before, after = (line.split() for line in out.stdout.splitlines())
    assert before == ["before", "0"]
    assert after[0] == "after" and int(after[1]) > 1000  # every module, the config and the apps
