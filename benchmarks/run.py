"""metaemu benchmark: ``.venv/bin/python benchmarks/run.py [--quick] [--output FILE]``.

Measures, in one run: (1) throughput, latency and CPU per request of the token, ID token and email
requests against Go's net/http and a bare aiohttp handler on uvloop serving the same bytes,
(2) cold start of ``metaemu serve`` to its first token, (3) resident memory idle and under a flood
of distinct ID-token audiences, (4) upstream calls per identity per simulated hour under sustained
load. Prints a Markdown table and writes the figures as JSON (``benchmarks/results.json`` for a
full run). See benchmarks/README.md for the method. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` and ``metaemu`` importable
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from benchmarks.load import Tool, default_tool, wrk_version  # noqa: E402
from benchmarks.report import Row, render, startup_rows, throughput_rows, upstream_rows  # noqa: E402
from benchmarks.startup import measure_startup  # noqa: E402
from benchmarks.throughput import measure_throughput  # noqa: E402
from benchmarks.upstream_calls import measure_upstream_calls  # noqa: E402
from metaemu import __version__ as metaemu_version  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    runs: int  # alternating baseline/metaemu pairs
    run_s: int  # seconds per load run (wrk takes whole seconds)
    warmup_s: int
    connections: int
    cold_starts: int
    flood_audiences: int  # per flood; above the ID-token LRU size (1024) so it evicts
    floods: int
    sim_hours: float
    sim_step_s: float
    sim_rates: tuple[int, ...]  # token requests per simulated step, one run each


FULL = Settings(runs=5, run_s=5, warmup_s=1, connections=50, cold_starts=5, flood_audiences=10_000, floods=2,
                sim_hours=6, sim_step_s=10, sim_rates=(1, 50))
#: Smoke run for CI (`run.py --quick`): every code path, about 15 s, figures only indicative.
QUICK = Settings(runs=1, run_s=1, warmup_s=1, connections=50, cold_starts=1, flood_audiences=1_500, floods=2,
                 sim_hours=2, sim_step_s=10, sim_rates=(1, 10))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = QUICK if args.quick else FULL
    tool: Tool = args.load_generator if args.load_generator != "auto" else default_tool()
    output: Path | None = args.output or (None if args.quick else DEFAULT_OUTPUT)
    server_cpu, load_cpu = _cpus()
    machine = _machine(tool, server_cpu, load_cpu)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    started = time.perf_counter()

    _progress("1/4 token, ID token, email: Go net/http and bare aiohttp+uvloop baselines vs metaemu")
    throughput = measure_throughput(tool=tool, runs=settings.runs, run_s=settings.run_s, warmup_s=settings.warmup_s,
                                    connections=settings.connections, server_cpu=server_cpu, load_cpu=load_cpu)
    _progress("2-3/4 cold start and RSS of `metaemu serve`")
    startup = measure_startup(runs=settings.cold_starts, flood_audiences=settings.flood_audiences,
                              floods=settings.floods, server_cpu=server_cpu, load_cpu=load_cpu)
    _progress("4/4 upstream calls under sustained load (FakeClock)")
    upstream = [measure_upstream_calls(hours=settings.sim_hours, step_s=settings.sim_step_s, requests_per_step=rate)
                for rate in settings.sim_rates]

    # Anything else running on the machine skews the real-time figures; record how busy it was.
    machine["load average"] = f"{machine.pop('load average at start')} at start, {os.getloadavg()[0]:.2f} at end"
    rows: list[Row] = [*throughput_rows(throughput, settings.runs), *startup_rows(startup), *upstream_rows(upstream)]
    print(f"metaemu {metaemu_version} benchmark ({'quick' if args.quick else 'full'} run, "
          f"{time.perf_counter() - started:.0f} s)")
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print()
    print(render(rows))
    failed = [r.name for r in rows if r.ok is False]
    if output is not None:
        result = {"command": command, "mode": "quick" if args.quick else "full", "machine": machine,
                  "settings": _settings_json(settings), "throughput": throughput.as_json(),
                  "startup": startup.as_json(), "upstream_calls": [u.as_json() for u in upstream],
                  "targets_failed": failed}
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {os.path.relpath(output)}")
    return 1 if args.check and failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark metaemu (see benchmarks/README.md).")
    p.add_argument("--quick", action="store_true", help="short smoke run (~15 s); writes JSON only with --output")
    p.add_argument("--output", type=Path, help=f"JSON results file (default for a full run: {DEFAULT_OUTPUT.name})")
    p.add_argument("--load-generator", choices=("auto", "wrk", "aiohttp"), default="auto",
                   help="auto: wrk when installed, else an aiohttp client")
    p.add_argument("--check", action="store_true", help="exit 1 when a figure misses its target")
    return p


def _cpus() -> tuple[int | None, int | None]:
    """(server core, load generator core); unpinned when fewer than two cores are usable."""
    usable = sorted(os.sched_getaffinity(0))
    return (usable[0], usable[1]) if len(usable) >= 2 else (None, None)


def _machine(tool: Tool, server_cpu: int | None, load_cpu: int | None) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "load generator": (wrk_version() or "wrk") if tool == "wrk" else f"aiohttp {aiohttp.__version__} client",
        "pinning": (f"servers on CPU {server_cpu}, load on CPU {load_cpu}" if server_cpu is not None
                    else "none (fewer than 2 usable CPUs)"),
        "load average at start": f"{os.getloadavg()[0]:.2f}",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _settings_json(s: Settings) -> dict[str, Any]:
    return {"runs": s.runs, "run_s": s.run_s, "warmup_s": s.warmup_s, "connections": s.connections,
            "cold_starts": s.cold_starts, "flood_audiences": s.flood_audiences, "floods": s.floods,
            "sim_hours": s.sim_hours, "sim_step_s": s.sim_step_s, "sim_rates": list(s.sim_rates)}


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
