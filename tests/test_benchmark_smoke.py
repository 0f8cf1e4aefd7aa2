"""The benchmark script keeps working: a --quick run completes and reports every measurement.
It asserts no timings (performance is judged by the full run, benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
