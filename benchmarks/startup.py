"""``metaemu serve`` as a real subprocess: cold start to first token, and resident memory.

Owns launching ``python -m metaemu serve --config FILE`` against the Google stand-in on a loopback
socket (in its own process), timing it until the token endpoint first answers 200, reading its
RSS from ``/proc/PID/status``, and flooding it with distinct ID-token audiences to show the
ID-token cache (an LRU) keeps memory bounded.

Not owned here: the stand-in itself (``servers.google_main``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.servers import LOOPBACK, TOKEN_PATH, ServerProcess, google_main, http_get, pin_to_cpu

FLAVOR = {"Metadata-Flavor": "Google"}
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
#: Poll interval while waiting for the first token: the resolution of the cold-start figure.
POLL_INTERVAL_S = 0.002
#: A cold start slower than this is a failure, not a measurement.
START_DEADLINE_S = 30.0
#: ID-token requests in flight during the flood. Each is a cache miss and one generateIdToken
#: (an RS256 signature in the stand-in); more in flight only queues behind the stand-in.
FLOOD_CONCURRENCY = 16
FLOOD_REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ColdStart:
    listening_s: float  # first HTTP answer of any status
    first_token_s: float  # first 200 from the token endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class Flood:
    audiences: int
    seconds: float
    statuses: dict[int, int]
    rss_kb: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StartupResult:
    cold_starts: list[ColdStart]
    idle_rss_kb: int
    floods: list[Flood]
    peak_rss_kb: int

    @property
    def median_first_token_s(self) -> float:
        return statistics.median(c.first_token_s for c in self.cold_starts)

    @property
    def median_listening_s(self) -> float:
        return statistics.median(c.listening_s for c in self.cold_starts)

    def as_json(self) -> dict[str, Any]:
        return {
            "cold_start_first_token_s": [c.first_token_s for c in self.cold_starts],
            "cold_start_listening_s": [c.listening_s for c in self.cold_starts],
            "median_first_token_s": self.median_first_token_s, "median_listening_s": self.median_listening_s,
            "idle_rss_kb": self.idle_rss_kb, "peak_rss_kb": self.peak_rss_kb,
            "floods": [{"audiences": f.audiences, "seconds": f.seconds, "statuses": f.statuses,
                        "rss_kb": f.rss_kb} for f in self.floods],
        }


def measure_startup(*, runs: int, flood_audiences: int, floods: int, server_cpu: int | None,
                    load_cpu: int | None) -> StartupResult:
    """``runs`` cold starts; the last instance is then measured idle and after each flood."""
    with tempfile.TemporaryDirectory(prefix="metaemu-bench-") as tmp, \
            ServerProcess(google_main, load_cpu, tmp) as google:
        config = Path(tmp) / "metaemu.yaml"
        port, admin_port = _free_port(), _free_port()
        raw: dict[str, Any] = dict(google.info)
        raw |= {"listen": f"{LOOPBACK}:{port}", "admin_listen": f"{LOOPBACK}:{admin_port}", "log_level": "warning"}
        config.write_text(yaml.safe_dump(raw))
        cold: list[ColdStart] = []
        for i in range(runs):
            with _metaemu_serve(config, cpu=server_cpu, log=Path(tmp) / f"metaemu-{i}.log") as proc:
                cold.append(_time_first_token(proc, port))
                if i < runs - 1:
                    continue
                idle = rss_kb(proc.pid)
                results: list[Flood] = []
                for n in range(floods):
                    seconds, statuses = asyncio.run(_flood(port, start=n * flood_audiences, count=flood_audiences))
                    results.append(Flood(audiences=flood_audiences, seconds=seconds, statuses=statuses,
                                         rss_kb=rss_kb(proc.pid)))
                peak = rss_kb(proc.pid, field="VmHWM")
    return StartupResult(cold_starts=cold, idle_rss_kb=idle, floods=results, peak_rss_kb=peak)


@contextlib.contextmanager
def _metaemu_serve(config: Path, *, cpu: int | None, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "metaemu", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=lambda: pin_to_cpu(cpu))
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _time_first_token(proc: subprocess.Popen[bytes], port: int) -> ColdStart:
    """Seconds from just after ``Popen`` returned until the token endpoint first answers 200."""
    started = time.perf_counter()
    listening: float | None = None
    while (elapsed := time.perf_counter() - started) < START_DEADLINE_S:
        if proc.poll() is not None:
            raise RuntimeError(f"metaemu serve exited with {proc.returncode} before its first token")
        try:
            status, _, _ = http_get(port, TOKEN_PATH, headers=FLAVOR, timeout_s=START_DEADLINE_S)
        except OSError:
            status = 0
        now = time.perf_counter() - started
        if status and listening is None:
            listening = now
        if status == 200:
            return ColdStart(listening_s=listening or now, first_token_s=now)
        time.sleep(POLL_INTERVAL_S)
    raise RuntimeError(f"metaemu serve served no token within {elapsed:.1f}s")


async def _flood(port: int, *, start: int, count: int) -> tuple[float, dict[int, int]]:
    """``count`` ID-token requests, each for a new audience, ``FLOOD_CONCURRENCY`` at a time.

    Returns the seconds taken and the count of each HTTP status (0: no answer).
    """
    statuses: Counter[int] = Counter()
    audiences = iter(range(start, start + count))
    url = f"http://{LOOPBACK}:{port}{IDENTITY_PATH}"
    timeout = aiohttp.ClientTimeout(total=FLOOD_REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers=FLAVOR) as session:

        async def worker() -> None:
            for i in audiences:  # shared iterator: each audience is requested once
                try:
                    async with session.get(url, params={"audience": f"https://aud-{i}.example"}) as resp:
                        await resp.read()
                        statuses[resp.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    statuses[0] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(FLOOD_CONCURRENCY)))
        seconds = time.perf_counter() - started
    return seconds, dict(sorted(statuses.items()))


def rss_kb(pid: int, *, field: str = "VmRSS") -> int:
    """A ``/proc/PID/status`` memory field in KiB (VmRSS: resident now; VmHWM: peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])
