"""A pod's client loop for the upgrade tests and benchmark (issue #11): run inside a pod's network
namespace, it asks http://169.254.169.254 for its default token over one keep-alive connection at a
fixed rate, the way a client library's session does (reconnecting only when the server says
``Connection: close`` or closes), and never retries: every error is counted.

``python tests/node/metadata_loop.py RATE_PER_S MAX_S`` prints ``STARTED`` once its first request
succeeded, then runs until a line arrives on stdin (or MAX_S, a bound) and prints one JSON line:
requests, failures (count and the first few), statuses, the distinct tokens seen, the longest
interval without a success (ms) and the latency of each request (ms). Standard library only.
"""

from __future__ import annotations

import http.client
import json
import select
import sys
import time
from collections import Counter
from typing import Any

PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
HEADERS = {"Metadata-Flavor": "Google"}
#: Per request; the agent answers from memory, so a second is already a failure worth seeing.
TIMEOUT_S = 5.0


def run(rate_per_s: float, max_s: float) -> dict[str, Any]:
    interval = 1.0 / rate_per_s
    connection: http.client.HTTPConnection | None = None
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    tokens: set[str] = set()
    latencies_ms: list[float] = []
    started = time.monotonic()
    last_success = started
    longest_gap_s = 0.0
    announced = False
    next_at = started
    while time.monotonic() - started < max_s:
        if announced and select.select([sys.stdin], [], [], 0)[0]:
            break
        if connection is None:
            connection = http.client.HTTPConnection("169.254.169.254", 80, timeout=TIMEOUT_S)
        current = connection
        sent = time.monotonic()
        try:
            current.request("GET", PATH, headers=HEADERS)
            response = current.getresponse()
            body = response.read()
            if response.will_close:
                current.close()
                connection = None
        except (OSError, http.client.HTTPException) as exc:
            current.close()
            connection = None
            failures.append(f"{time.monotonic() - started:.3f}s {type(exc).__name__}: {exc}")
            statuses["error"] += 1
        else:
            statuses[str(response.status)] += 1
            if response.status == 200:
                tokens.add(json.loads(body)["access_token"])
                now = time.monotonic()
                if announced:  # between successes only: not the wait for the first one
                    longest_gap_s = max(longest_gap_s, now - last_success)
                last_success = now
                if not announced:
                    print("STARTED", flush=True)
                    announced = True
            else:
                failures.append(f"{time.monotonic() - started:.3f}s HTTP {response.status}: {body[:200]!r}")
        latencies_ms.append((time.monotonic() - sent) * 1000)
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))  # the loop's own pacing, not a wait for an event
    return {"requests": sum(statuses.values()), "failure_count": len(failures), "failures": failures[:10],
            "statuses": dict(statuses), "tokens": sorted(tokens), "longest_gap_ms": longest_gap_s * 1000,
            "latencies_ms": latencies_ms}


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]), float(sys.argv[2]))), flush=True)
