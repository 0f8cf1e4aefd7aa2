"""Throughput, latency and cost of the common requests: metaemu against Go's net/http and a bare
aiohttp handler on uvloop, serving the same bytes (issue #12).

Three servers run at once, each in its own process pinned to the server core (Go with
GOMAXPROCS=1); the load generator is pinned to the other core. The baselines answer exactly the
bytes and headers metaemu answered first for each request (token, ID token, email: same body,
``Content-Type``, ``Metadata-Flavor``, ``Server``, ``ETag``; each adds its own ``Date`` and
``Content-Length``), so the difference is request handling. Runs alternate (go, aiohttp,
metaemu, go, ...) so drift on a shared machine hits all alike; medians are reported.

Beside requests/s and latency: CPU time per request (the server process's user + system time
over a run, from /proc, divided by its requests) and resident memory idle (before any load) and
under load (the peak, VmHWM, after all runs).

Not owned here: how load is generated (``load.py``).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import LoadResult, Tool, run_load
from benchmarks.servers import (
    EMAIL_PATH,
    IDENTITY_PATH,
    TOKEN_PATH,
    Routes,
    ServerProcess,
    baseline_main,
    build_go_baseline,
    go_main,
    http_get,
    metaemu_main,
)

FLAVOR = {"Metadata-Flavor": "Google"}
#: Headers of metaemu's answers copied onto the baselines' (each adds Date and Content-Length).
COPIED_HEADERS = ("Content-Type", "Metadata-Flavor", "Server", "ETag")
ENDPOINTS = {"token": TOKEN_PATH, "identity": IDENTITY_PATH, "email": EMAIL_PATH}
SERVERS = ("go", "aiohttp", "metaemu")
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    load: LoadResult
    cpu_s: float  # the server process's CPU time during the run

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.load.requests * 1e6 if self.load.requests else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSummary:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float

    @classmethod
    def of(cls, runs: list[Run]) -> ServerSummary:
        return cls(rps=statistics.median(r.load.rps for r in runs),
                   p50_ms=statistics.median(r.load.p50_ms for r in runs),
                   p99_ms=statistics.median(r.load.p99_ms for r in runs), errors=sum(r.load.errors for r in runs),
                   cpu_us=statistics.median(r.cpu_us_per_request for r in runs))


@dataclass(frozen=True, slots=True, kw_only=True)
class Memory:
    idle_kb: int
    peak_kb: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ThroughputResult:
    tool: str
    connections: int
    run_s: int
    runs: dict[str, dict[str, list[Run]]] = field(repr=False)  # endpoint -> server -> runs
    memory: dict[str, Memory]

    def summary(self, endpoint: str, server: str) -> ServerSummary:
        return ServerSummary.of(self.runs[endpoint][server])

    def ratio(self, endpoint: str, over: str) -> float:
        """Median metaemu requests/s over median ``over`` requests/s."""
        base = self.summary(endpoint, over).rps
        return self.summary(endpoint, "metaemu").rps / base if base else 0.0

    def pair_ratios(self, endpoint: str, over: str) -> list[float]:
        runs = self.runs[endpoint]
        return [m.load.rps / b.load.rps if b.load.rps else 0.0 for b, m in zip(runs[over], runs["metaemu"],
                                                                                strict=True)]

    @property
    def ratio_go(self) -> float:
        """The headline: cached token requests/s, metaemu over Go net/http."""
        return self.ratio("token", "go")

    def as_json(self) -> dict[str, Any]:
        def runs(rs: list[Run]) -> list[dict[str, float]]:
            return [{"rps": r.load.rps, "p50_ms": r.load.p50_ms, "p99_ms": r.load.p99_ms,
                     "requests": r.load.requests, "errors": r.load.errors, "cpu_s": r.cpu_s} for r in rs]

        endpoints = {}
        for endpoint, by_server in self.runs.items():
            endpoints[endpoint] = {
                "ratio_go": self.ratio(endpoint, "go"), "ratio_aiohttp": self.ratio(endpoint, "aiohttp"),
                "pair_ratios_go": self.pair_ratios(endpoint, "go"),
                "pair_ratios_aiohttp": self.pair_ratios(endpoint, "aiohttp"),
                **{server: {**_summary_json(self.summary(endpoint, server)), "runs": runs(rs)}
                   for server, rs in by_server.items()}}
        return {"tool": self.tool, "connections": self.connections, "run_s": self.run_s, "ratio": self.ratio_go,
                "endpoints": endpoints,
                "memory_kb": {s: {"idle": m.idle_kb, "peak": m.peak_kb} for s, m in self.memory.items()}}


def _summary_json(s: ServerSummary) -> dict[str, float]:
    return {"rps": s.rps, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "errors": s.errors, "cpu_us": s.cpu_us}


def measure_throughput(*, tool: Tool, runs: int, run_s: int, warmup_s: int, connections: int, server_cpu: int | None,
                       load_cpu: int | None) -> ThroughputResult:
    """For each endpoint, ``runs`` alternating rounds of ``run_s``-second runs (one per server)
    after one discarded warm-up run each."""
    with tempfile.TemporaryDirectory(prefix="metaemu-bench-go-") as tmp, \
            ServerProcess(metaemu_main, server_cpu) as metaemu:
        routes = _answers(metaemu.info[0])
        go_binary = build_go_baseline(Path(tmp))
        with ServerProcess(go_main, server_cpu, str(go_binary), routes) as go, \
                ServerProcess(baseline_main, server_cpu, routes) as bare:
            servers = {"go": go.info, "aiohttp": bare.info, "metaemu": metaemu.info}
            for name, (port, _) in servers.items():
                if name != "metaemu":
                    _check_same(name, port, routes)
            idle = {name: _rss_kb(pid) for name, (_, pid) in servers.items()}
            results: dict[str, dict[str, list[Run]]] = {e: {s: [] for s in SERVERS} for e in ENDPOINTS}

            def one(endpoint: str, name: str, seconds: int) -> Run:
                port, pid = servers[name]
                before = _cpu_s(pid)
                load = run_load(f"http://127.0.0.1:{port}{ENDPOINTS[endpoint]}", tool=tool, headers=FLAVOR,
                                connections=connections, duration_s=seconds, cpu=load_cpu)
                return Run(load=load, cpu_s=_cpu_s(pid) - before)

            for endpoint in ENDPOINTS:
                for name in SERVERS:
                    one(endpoint, name, warmup_s)
                for _ in range(runs):
                    for name in SERVERS:
                        results[endpoint][name].append(one(endpoint, name, run_s))
            memory = {name: Memory(idle_kb=idle[name], peak_kb=_status_kb(pid, "VmHWM"))
                      for name, (_, pid) in servers.items()}
    tool_name = results["token"]["metaemu"][0].load.tool
    return ThroughputResult(tool=tool_name, connections=connections, run_s=run_s, runs=results, memory=memory)


def _answers(port: int) -> Routes:
    """metaemu's answer to each benchmark request: what the baselines will serve."""
    routes: Routes = {}
    for endpoint, target in ENDPOINTS.items():
        status, headers, body = http_get(port, target, headers=FLAVOR)
        if status != 200 or (endpoint == "token" and "access_token" not in json.loads(body)):
            raise RuntimeError(f"metaemu answered {target} with {status}: {body[:200]!r}")
        routes[target] = (body, {name: headers[name] for name in COPIED_HEADERS if name in headers})
    return routes


def _check_same(name: str, port: int, routes: Routes) -> None:
    for target, (body, headers) in routes.items():
        status, got, got_body = http_get(port, target, headers=FLAVOR)
        if status != 200 or got_body != body or any(got.get(k) != v for k, v in headers.items()):
            raise RuntimeError(f"the {name} baseline does not answer {target} like metaemu: {status} {got} "
                               f"{got_body[:80]!r}")


def _cpu_s(pid: int) -> float:
    """User + system CPU time of the process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime (fields 14 and 15)


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS")
