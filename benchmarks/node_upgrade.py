"""Node-mode upgrades and crashes under load on the simulated node (issue #11).

Two real ``metaemu serve`` agents in the node namespace (pinned to the server core) share one
Google stand-in and the test bed's real kube-apiserver; PODS pods, each with its own annotated
service account, run a client loop (tests/node/metadata_loop.py, pinned to the load core: one
keep-alive connection, a fixed rate, no retries) through the real interception rule.

1. Surge hand-over, as a DaemonSet rolling update with ``maxSurge: 1`` does it: agent A serves;
   agent B starts, warms and listens; once B's readiness probe passes, A gets SIGTERM, drains and
   exits. Figures: requests, failed requests, foreign or invalid tokens (checked with the stand-in),
   the achieved rate, the longest interval a pod went without a token.
2. Crash: the serving agent gets SIGKILL and a new one starts at once (as kubelet restarts a
   container). Figures: the longest interval a pod went without a token (restart to first token,
   as the pods saw it), the new agent's start to ready, and the upstream exchanges it made
   (one per service account is the floor).

Needs root and the test bed's binaries (``make test`` builds them). Run:
``.venv/bin/python benchmarks/node_upgrade.py [--quick]``; writes
``benchmarks/node_upgrade_results.json`` (full run). Bounded: fixed rates, durations and rounds.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.kube.session import running_cluster  # noqa: E402
from tests.kube.upgrade_world import START_S, Upgrade, finish, foreign_tokens, upgrade_world  # noqa: E402

PODS = 5
RATE_PER_POD = 50.0  # 250 requests/s in all (the issue asks for >= 200)
#: Per-pod limit for the run: the product's default (20/s) would refuse this load with 429.
RATE_LIMIT = 200.0
SERVER_CPU, LOAD_CPU = 0, 1
#: Load before and after each event, so that both agents serve under load.
SETTLE_S = 2.0
DEFAULT_OUTPUT = ROOT / "benchmarks" / "node_upgrade_results.json"


def _summary(results: dict[int, dict[str, Any]], world: Upgrade, elapsed_s: float) -> dict[str, Any]:
    latencies = sorted(ms for r in results.values() for ms in r["latencies_ms"])
    requests = sum(r["requests"] for r in results.values())
    return {"requests": requests, "failed": sum(r["failure_count"] for r in results.values()),
            "failures": [f for r in results.values() for f in r["failures"]][:10],
            "foreign_tokens": len(foreign_tokens(world, results)),
            "rate_per_s": round(requests / elapsed_s, 1),
            "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
            "longest_gap_ms": round(max(r["longest_gap_ms"] for r in results.values()), 1)}


def surge(world: Upgrade, n: int) -> dict[str, Any]:
    """Agent ``n`` serves; hand over to agent ``n + 1`` under load. Returns the figures."""
    old = world.agents[-1]
    loops = world.loops(RATE_PER_POD, 120, cpu=LOAD_CPU)
    started = time.monotonic()
    time.sleep(SETTLE_S)  # load on the old agent alone: part of the measured window, not a wait for an event
    new = world.start_agent(n + 1, rate_limit_per_second=RATE_LIMIT, cpu=SERVER_CPU)
    world.wait_ready(n + 1, new)
    ready_s = time.monotonic() - started - SETTLE_S
    old.send_signal(signal.SIGTERM)
    exit_code = old.wait(timeout=START_S)
    time.sleep(SETTLE_S)  # load on the new agent alone
    results = finish(loops)
    out = _summary(results, world, time.monotonic() - started)
    out.update(new_agent_start_to_ready_s=round(ready_s, 2), old_agent_exit_code=exit_code)
    return out


def crash(world: Upgrade, n: int) -> dict[str, Any]:
    """SIGKILL the serving agent ``n`` under load and start agent ``n + 1`` at once."""
    old = world.agents[-1]
    loops = world.loops(RATE_PER_POD, 120, cpu=LOAD_CPU)
    started = time.monotonic()
    time.sleep(SETTLE_S)
    before = world.calls()
    old.send_signal(signal.SIGKILL)
    old.wait(timeout=START_S)
    restart = time.monotonic()
    new = world.start_agent(n + 1, rate_limit_per_second=RATE_LIMIT, cpu=SERVER_CPU)
    world.wait_ready(n + 1, new)
    ready_s = time.monotonic() - restart
    time.sleep(SETTLE_S)
    results = finish(loops)
    after = world.calls()
    out = _summary(results, world, time.monotonic() - started)
    out.update(restart_to_ready_s=round(ready_s, 2),
               sts_exchanges=after.get("sts", 0) - before.get("sts", 0),
               impersonations=after.get("generateAccessToken", 0) - before.get("generateAccessToken", 0),
               service_accounts=PODS)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one round of each, for a smoke run")
    p.add_argument("--output", type=Path, help=f"JSON results (default for a full run: {DEFAULT_OUTPUT})")
    args = p.parse_args()
    rounds = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="metaemu-upgrade-") as tmp, \
            running_cluster(Path(tmp) / "kube") as kube, upgrade_world(kube, Path(tmp), pods=PODS) as world:
        first = world.start_agent(1, rate_limit_per_second=RATE_LIMIT, cpu=SERVER_CPU)
        world.wait_ready(1, first)
        for i in world.node.pods:
            world.pod(i)
        n = 1
        surges, crashes = [], []
        for _ in range(rounds):
            surges.append(surge(world, n))
            n += 1
            crashes.append(crash(world, n))
            n += 1
    result = {"pods": PODS, "rate_per_pod": RATE_PER_POD, "surges": surges, "crashes": crashes,
              "surge_failed_total": sum(s["failed"] for s in surges),
              "surge_foreign_tokens_total": sum(s["foreign_tokens"] for s in surges),
              "crash_gap_ms_median": statistics.median(c["longest_gap_ms"] for c in crashes),
              "crash_gap_ms_max": max(c["longest_gap_ms"] for c in crashes)}
    print(json.dumps(result, indent=2))
    output = args.output or (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
