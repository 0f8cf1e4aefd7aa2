"""Token endpoint throughput and latency: metaemu against a bare aiohttp handler.

Both servers run at once, each in its own process pinned to the server core; the load generator
is pinned to the other core. The baseline answers the exact bytes and headers metaemu answered
first (same token, same ``Content-Type``, ``Metadata-Flavor`` and ``Server``), so the difference
is metaemu's request handling: rules, routing, cache lookup, metrics. Runs alternate (baseline,
metaemu, baseline, ...) so drift on a shared machine hits both alike; medians are reported.

Not owned here: how load is generated (``load.py``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Any

from benchmarks.load import LoadResult, Tool, run_load
from benchmarks.servers import TOKEN_PATH, ServerProcess, baseline_main, http_get, metaemu_main

FLAVOR = {"Metadata-Flavor": "Google"}
#: Headers of metaemu's token response copied onto the baseline's (aiohttp adds Date and
#: Content-Length to both).
COPIED_HEADERS = ("Content-Type", "Metadata-Flavor", "Server")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSummary:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int

    @classmethod
    def of(cls, runs: list[LoadResult]) -> ServerSummary:
        return cls(rps=statistics.median(r.rps for r in runs), p50_ms=statistics.median(r.p50_ms for r in runs),
                   p99_ms=statistics.median(r.p99_ms for r in runs), errors=sum(r.errors for r in runs))


@dataclass(frozen=True, slots=True, kw_only=True)
class ThroughputResult:
    tool: str
    connections: int
    run_s: int
    response_bytes: int
    baseline_runs: list[LoadResult] = field(repr=False)
    metaemu_runs: list[LoadResult] = field(repr=False)

    @property
    def baseline(self) -> ServerSummary:
        return ServerSummary.of(self.baseline_runs)

    @property
    def metaemu(self) -> ServerSummary:
        return ServerSummary.of(self.metaemu_runs)

    @property
    def ratio(self) -> float:
        """Median metaemu requests/s over median baseline requests/s (the headline)."""
        return self.metaemu.rps / self.baseline.rps if self.baseline.rps else 0.0

    @property
    def pair_ratios(self) -> list[float]:
        return [m.rps / b.rps if b.rps else 0.0 for b, m in zip(self.baseline_runs, self.metaemu_runs, strict=True)]

    def as_json(self) -> dict[str, Any]:
        def runs(rs: list[LoadResult]) -> list[dict[str, float]]:
            return [{"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "requests": r.requests,
                     "errors": r.errors} for r in rs]

        return {"tool": self.tool, "connections": self.connections, "run_s": self.run_s,
                "response_bytes": self.response_bytes, "ratio": self.ratio, "pair_ratios": self.pair_ratios,
                "baseline": _summary_json(self.baseline), "metaemu": _summary_json(self.metaemu),
                "baseline_runs": runs(self.baseline_runs), "metaemu_runs": runs(self.metaemu_runs)}


def _summary_json(s: ServerSummary) -> dict[str, float]:
    return {"rps": s.rps, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "errors": s.errors}


def measure_throughput(*, tool: Tool, runs: int, run_s: int, warmup_s: int, connections: int, server_cpu: int | None,
                       load_cpu: int | None) -> ThroughputResult:
    """``runs`` alternating pairs of ``run_s``-second runs after one discarded warm-up run each."""
    with ServerProcess(metaemu_main, server_cpu) as metaemu:
        metaemu_port: int = metaemu.info
        status, headers, body = http_get(metaemu_port, TOKEN_PATH, headers=FLAVOR)
        if status != 200 or "access_token" not in json.loads(body):
            raise RuntimeError(f"metaemu answered the token request with {status}: {body[:200]!r}")
        copied = {name: headers[name] for name in COPIED_HEADERS}
        with ServerProcess(baseline_main, server_cpu, body, copied) as baseline:
            baseline_port: int = baseline.info
            _check_same(baseline_port, copied, body)
            urls = {"baseline": f"http://127.0.0.1:{baseline_port}{TOKEN_PATH}",
                    "metaemu": f"http://127.0.0.1:{metaemu_port}{TOKEN_PATH}"}
            results: dict[str, list[LoadResult]] = {"baseline": [], "metaemu": []}

            def one(name: str, seconds: int) -> LoadResult:
                return run_load(urls[name], tool=tool, headers=FLAVOR, connections=connections, duration_s=seconds,
                                cpu=load_cpu)

            for name in urls:
                one(name, warmup_s)
            for _ in range(runs):
                for name in urls:
                    results[name].append(one(name, run_s))
    return ThroughputResult(tool=results["metaemu"][0].tool, connections=connections, run_s=run_s,
                            response_bytes=len(body), baseline_runs=results["baseline"],
                            metaemu_runs=results["metaemu"])


def _check_same(port: int, headers: dict[str, str], body: bytes) -> None:
    status, got, got_body = http_get(port, TOKEN_PATH, headers=FLAVOR)
    if status != 200 or got_body != body or any(got.get(k) != v for k, v in headers.items()):
        raise RuntimeError(f"the baseline does not answer like metaemu: {status} {got} {got_body[:80]!r}")
