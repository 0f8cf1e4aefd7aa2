"""The benchmark scripts keep working: a --quick run completes and reports every measurement.
They assert no timings (performance is judged by the full run, benchmarks/README.md); the first-
request benchmark's behaviour (every first request served, with the pod's own token) holds in any run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.kube.cluster import KubeCluster

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_run_reports_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["throughput"]["ratio"] > 0
    assert results["startup"]["idle_rss_kb"] > 0
    assert all(r["statuses"] == {"200": r["requests"]} for r in results["upstream_calls"])
    for endpoint in ("token", "identity", "email"):
        figures = results["throughput"]["endpoints"][endpoint]
        assert figures["ratio_go"] > 0 and figures["ratio_aiohttp"] > 0, endpoint
        assert figures["metaemu"]["cpu_us"] > 0, endpoint
        assert f"| **{endpoint}: ratio metaemu / Go net/http**" in proc.stdout
    assert all(m["idle"] > 0 and m["peak"] >= m["idle"] for m in results["throughput"]["memory_kb"].values())


@pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(c) for c in ("ip", "iptables", "taskset")),
                    reason="needs root, iproute2, iptables and taskset to build a simulated node")
def test_first_request_quick_run_serves_every_new_pod_its_own_token(cluster: KubeCluster, tmp_path: Path) -> None:
    """benchmarks/first_request.py's quick settings on the session's cluster (its own simulated node
    and agent): both phases complete, every first request gets 200 with the pod's own Google
    account's token, and every pod's exchange was started by the prefetch."""
    from benchmarks.first_request import QUICK, Cpus, measure, render

    result = measure(cluster, tmp_path, QUICK, Cpus.usable())
    for name, phase in result["phases"].items():
        assert phase["statuses"] == {"200": QUICK.pods_per_phase}, (name, phase)
        assert phase["foreign_or_invalid_tokens"] == 0, name
        assert phase["agent_counters"]["metaemu_pod_prefetches_total{result=started}"] == QUICK.pods_per_phase, name
    assert set(result["targets"]) >= {"after_1s p99 < 10 ms", "at_once errors == 0"}
    assert f"| at_once | {QUICK.pods_per_phase} | 0 |" in render(result)
