"""HTTP load generation against a loopback URL: ``wrk`` when installed, else an aiohttp client.

Owns one timed run with N keep-alive connections and its result (requests/s, p50, p99, errors).
The generator runs in its own process pinned to its own core, so it never shares an event loop or
a CPU with the server under test. ``wrk`` (C, epoll) is preferred: the aiohttp fallback costs about
as much CPU per request as the server it drives, so with it the figures are a lower bound.

Not owned here: starting servers (``servers.py``) or alternating runs (``throughput.py``).
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import multiprocessing.connection
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

from benchmarks.servers import pin_to_cpu

#: A request slower than this counts as an error: a server answering from memory that takes
#: seconds is broken, and the bound keeps every run finite.
REQUEST_TIMEOUT_S = 2
#: Slack on top of the run's own duration before a wedged generator is killed.
RUN_SLACK_S = 30.0

#: wrk's ``done`` hook prints one machine-readable line (latency in microseconds).
_WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d,"
    .. "\\"socket_errors\\":%d,\\"non_2xx\\":%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    tool: str
    requests: int
    duration_s: float
    errors: int  # socket errors, timeouts and non-2xx answers
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


Tool = Literal["wrk", "aiohttp"]


def default_tool() -> Tool:
    """wrk when it is on PATH, else the aiohttp client."""
    return "wrk" if shutil.which("wrk") else "aiohttp"


def wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    proc = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10, check=False)
    first = (proc.stdout or proc.stderr).splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk"


def run_load(url: str, *, tool: Tool, headers: Mapping[str, str], connections: int, duration_s: int,
             cpu: int | None) -> LoadResult:
    """One run of ``duration_s`` whole seconds (wrk's unit) with ``connections`` connections."""
    if tool == "wrk":
        wrk = shutil.which("wrk")
        if wrk is None:
            raise RuntimeError("wrk is not installed (apt-get install wrk), use the aiohttp load generator")
        return _run_wrk(wrk, url, headers=headers, connections=connections, duration_s=duration_s, cpu=cpu)
    return _run_aiohttp(url, headers=headers, connections=connections, duration_s=duration_s, cpu=cpu)


# ---------------------------------------------------------------- wrk


def _run_wrk(wrk: str, url: str, *, headers: Mapping[str, str], connections: int, duration_s: int,
             cpu: int | None) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="metaemu-wrk-") as tmp:
        proc = start_wrk(wrk, url, headers=headers, connections=connections, duration_s=duration_s, cpu=cpu,
                         workdir=Path(tmp))
        return wrk_result(proc, duration_s=duration_s)


def start_wrk(wrk: str, url: str, *, headers: Mapping[str, str], connections: int, duration_s: int,
              cpu: int | None, workdir: Path, prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """wrk on its way, pinned to ``cpu``, run under ``prefix`` (``ip netns exec NS``: from a pod)."""
    script = workdir / "report.lua"
    script.write_text(_WRK_SCRIPT)
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", f"--timeout={REQUEST_TIMEOUT_S}s", "-s", str(script)]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    return subprocess.Popen([*prefix, *cmd, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: pin_to_cpu(cpu))


def wrk_result(proc: subprocess.Popen[str], *, duration_s: int) -> LoadResult:
    """The result of a ``start_wrk`` run (waits for it, bounded)."""
    try:
        stdout, stderr = proc.communicate(timeout=duration_s + RUN_SLACK_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {stderr.strip() or stdout.strip()}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return LoadResult(tool="wrk", requests=int(data["requests"]), duration_s=data["duration_us"] / 1e6,
                      errors=int(data["socket_errors"]) + int(data["non_2xx"]),
                      p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000)


# ---------------------------------------------------------------- aiohttp fallback


def _run_aiohttp(url: str, *, headers: Mapping[str, str], connections: int, duration_s: int,
                 cpu: int | None) -> LoadResult:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=aiohttp_load_main, args=(child, cpu, url, dict(headers), connections, duration_s),
                          daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(duration_s + RUN_SLACK_S):
            raise RuntimeError("the aiohttp load generator did not finish in time")
        data: dict[str, Any] = parent.recv()
    finally:
        process.join(RUN_SLACK_S)
        if process.is_alive():
            process.kill()
            process.join()
        parent.close()
    return LoadResult(tool="aiohttp-client", requests=data["requests"], duration_s=data["duration_s"],
                      errors=data["errors"], p50_ms=data["p50_ms"], p99_ms=data["p99_ms"])


def aiohttp_load_main(conn: multiprocessing.connection.Connection, cpu: int | None, url: str,
                      headers: dict[str, str], connections: int, duration_s: int) -> None:
    pin_to_cpu(cpu)
    conn.send(asyncio.run(_aiohttp_load(url, headers=headers, connections=connections, duration_s=duration_s)))


async def _aiohttp_load(url: str, *, headers: dict[str, str], connections: int, duration_s: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + duration_s

        async def connection() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < deadline:
                try:
                    async with session.get(url, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status < 300
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                latencies.append(time.perf_counter() - start)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(connection() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "duration_s": elapsed, "errors": errors,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000}


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]
