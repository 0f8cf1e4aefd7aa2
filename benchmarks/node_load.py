"""Node mode under load on a simulated node (network namespaces, the real interception rule, the
test bed's real kube-apiserver; issues #4 and #12).

1. Throughput from several pods: three pods run wrk (pinned to the load core, 16 connections
   each) at 169.254.169.254 through the interception rule to the node agent (pinned to the server
   core, rate limits out of the way); the same pods then run it at a sidecar-mode metaemu on the
   node's address (same core, same veth path, no per-pod identity). Alternating runs; the ratio of
   median requests/s, node over sidecar, is the figure (target >= 0.8).
2. The per-pod rate limit (SEC-34): two pods flood the agent (the product's default limits) while
   a third makes 10 requests/s; its latency alone and during the flood, and what the flooders got.

Needs root (namespaces, iptables), wrk, and the test bed's binaries (built by ``make test``, or
``scripts/kube-testenv.sh``). Run: ``.venv/bin/python benchmarks/node_load.py [--quick]``; writes
``benchmarks/node_load_results.json`` (full run). Bounded: fixed durations and request counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load import LoadResult, start_wrk, wrk_result  # noqa: E402
from tests.kube.agent import agent_token, shipped_config, unique  # noqa: E402
from tests.kube.cluster import KubeCluster, stop_process  # noqa: E402
from tests.kube.session import running_cluster  # noqa: E402
from tests.kube.simulated import rules_and_apiserver  # noqa: E402
from tests.node.netns import NODE_IP, SimulatedNode  # noqa: E402

AGENT = f"{NODE_IP}:8080"
SIDECAR_PORT = 8082
CONTROL = 8090
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
FLAVOR = {"Metadata-Flavor": "Google"}
PODS = 3
CONNECTIONS_PER_POD = 16
SERVER_CPU, LOAD_CPU = 0, 1
#: Runs inside a pod namespace: keep-alive GETs to 169.254.169.254 for ``duration`` seconds, at most
#: ``max_requests``, one per ``interval`` seconds (0: as fast as possible); prints statuses and latencies.
_LOAD = r"""
import http.client, json, sys, time
duration, interval, max_requests = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
statuses, latencies = {}, []
end = time.monotonic() + duration
for _ in range(max_requests):
    start = time.monotonic()
    if start >= end:
        break
    conn.request("GET", sys.argv[4], headers={"Metadata-Flavor": "Google"})
    resp = conn.getresponse(); resp.read()
    latencies.append(time.monotonic() - start)
    statuses[resp.status] = statuses.get(resp.status, 0) + 1
    if interval:
        time.sleep(max(0.0, interval - (time.monotonic() - start)))
print(json.dumps({"statuses": statuses, "latencies": latencies}))
"""


@dataclass
class Bench:
    node: SimulatedNode
    kube: KubeCluster
    name: str
    kubeconfig: Path
    jwks: Path

    @contextlib.contextmanager
    def agent(self, **limits: float) -> Iterator[subprocess.Popen[str]]:
        """The node agent in the node namespace, pinned to the server core, serving pods 1..PODS."""
        extra = [a for k, v in limits.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        agent = self.node.popen_in(
            self.node.node_ns, "taskset", "-c", str(SERVER_CPU), sys.executable, "-m", "metaemu.testing.node_world",
            "--listen", AGENT, "--control-port", str(CONTROL), "--host-address", NODE_IP, "--node", self.name,
            "--kubeconfig", str(self.kubeconfig), "--cluster-jwks", str(self.jwks),
            "--audience", str(shipped_config()["node"]["audience"]), *extra, stdout=subprocess.PIPE)
        try:
            assert agent.stdout is not None
            if agent.stdout.readline().strip() != "READY":
                raise RuntimeError("the node agent did not become ready")
            yield agent
        finally:
            stop_process(agent)


@contextlib.contextmanager
def simulated_node(workdir: Path) -> Iterator[Bench]:
    with running_cluster(workdir / "kube") as kube:
        name = unique("bench-node")
        kube.node(name)
        kubeconfig = workdir / "agent.kubeconfig"
        kube.kubeconfig(kubeconfig, token=agent_token(kube, name), server=f"https://127.0.0.1:{kube.port}")
        jwks = workdir / "jwks.json"
        jwks.write_text(json.dumps(kube.jwks()))
        with SimulatedNode(pods=PODS) as node, rules_and_apiserver(kube, node, to=AGENT):
            bench = Bench(node, kube, name, kubeconfig, jwks)
            namespace = unique("bench")
            for i in range(1, PODS + 1):
                kube.service_account(namespace, f"ksa{i}")
                kube.pod(namespace, f"pod{i}", node=name, service_account=f"ksa{i}", ip=node.pod_ip(i),
                         host_ip=NODE_IP)
            yield bench


@contextlib.contextmanager
def sidecar(node: SimulatedNode, workdir: Path) -> Iterator[subprocess.Popen[str]]:
    """A sidecar-mode metaemu (the Google stand-in in process) on the node's address, same core."""
    script = ("import asyncio, sys; from benchmarks.servers import metaemu_sidecar_on; "
              f"metaemu_sidecar_on({NODE_IP!r}, {SIDECAR_PORT})")
    proc = node.popen_in(node.node_ns, "taskset", "-c", str(SERVER_CPU), sys.executable, "-c", script,
                         stdout=subprocess.PIPE, cwd=str(ROOT))
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError("the sidecar did not become ready")
        yield proc
    finally:
        stop_process(proc)


def from_pods(bench: Bench, url: str, duration_s: int, workdir: Path, server_pid: int) -> dict[str, Any]:
    """wrk from every pod at once; total requests/s, the worst p99, errors, and the server
    process's CPU time per request (user + system, /proc)."""
    cpu_before = _cpu_s(server_pid)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    procs = []
    for i in range(1, PODS + 1):
        pod_dir = workdir / f"wrk{i}"
        pod_dir.mkdir(exist_ok=True)
        procs.append(start_wrk(wrk, url, headers=FLAVOR, connections=CONNECTIONS_PER_POD, duration_s=duration_s,
                               cpu=LOAD_CPU, workdir=pod_dir, prefix=bench.node.exec_prefix(bench.node.pod_ns(i))))
    results: list[LoadResult] = [wrk_result(p, duration_s=duration_s) for p in procs]
    requests = sum(r.requests for r in results)
    return {"rps": sum(r.rps for r in results), "p99_ms": max(r.p99_ms for r in results),
            "p50_ms": statistics.median(r.p50_ms for r in results), "errors": sum(r.errors for r in results),
            "cpu_us_per_request": (_cpu_s(server_pid) - cpu_before) / requests * 1e6 if requests else 0.0}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(bench: Bench, workdir: Path, *, runs: int, run_s: int) -> dict[str, Any]:
    urls = {"node": f"http://169.254.169.254{TOKEN_PATH}", "sidecar": f"http://{NODE_IP}:{SIDECAR_PORT}{TOKEN_PATH}"}
    out: dict[str, list[dict[str, Any]]] = {"node": [], "sidecar": []}
    with bench.agent(rate_limit_per_second=1_000_000, rate_limit_burst=1_000_000) as agent, \
            sidecar(bench.node, workdir) as side:
        pids = {"node": agent.pid, "sidecar": side.pid}
        for name, url in urls.items():  # warm-up: the pods' first tokens, connections, caches
            from_pods(bench, url, 1, workdir, pids[name])
        for _ in range(runs):
            for name, url in urls.items():
                out[name].append(from_pods(bench, url, run_s, workdir, pids[name]))
    node_rps, sidecar_rps = (statistics.median(r["rps"] for r in out[n]) for n in ("node", "sidecar"))
    return {"pods": PODS, "connections_per_pod": CONNECTIONS_PER_POD, "run_s": run_s, "runs": out,
            "node_rps": node_rps, "sidecar_rps": sidecar_rps, "ratio": node_rps / sidecar_rps if sidecar_rps else 0.0,
            "node_p99_ms": statistics.median(r["p99_ms"] for r in out["node"]),
            "sidecar_p99_ms": statistics.median(r["p99_ms"] for r in out["sidecar"]),
            "node_cpu_us": statistics.median(r["cpu_us_per_request"] for r in out["node"]),
            "sidecar_cpu_us": statistics.median(r["cpu_us_per_request"] for r in out["sidecar"])}


def load(node: SimulatedNode, pod: int, *, duration_s: float, interval_s: float, max_requests: int) -> dict[str, Any]:
    out = node.run_in(node.pod_ns(pod), sys.executable, "-c", _LOAD, str(duration_s), str(interval_s),
                      str(max_requests), TOKEN_PATH, timeout_s=duration_s + 30)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    lat = sorted(result["latencies"])
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    return {"requests": len(lat), "statuses": result["statuses"],
            "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None, "p99_ms": round(p99 * 1000, 2)}


def flood(bench: Bench, duration_s: float) -> dict[str, Any]:
    node = bench.node
    with bench.agent():
        steady_requests = int(duration_s * 10) + 5  # 10 requests/s, well under the per-pod limit
        quiet = summary(load(node, 1, duration_s=duration_s, interval_s=0.1, max_requests=steady_requests))
        results: dict[int, dict[str, Any]] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, load(
            node, i, duration_s=duration_s, interval_s=0.0, max_requests=100_000))) for i in range(2, PODS + 1)]
        for t in threads:
            t.start()
        neighbour = summary(load(node, 1, duration_s=duration_s, interval_s=0.1, max_requests=steady_requests))
        for t in threads:
            t.join(timeout=duration_s + 60)
    return {"duration_s": duration_s, "flooding_pods": PODS - 1, "neighbour_alone": quiet,
            "neighbour_during_flood": neighbour, "flooders": [summary(results[i]) for i in sorted(results)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 round of 2 s and a 3 s flood")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("node_load.py needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    runs, run_s, flood_s = (1, 2, 3.0) if args.quick else (5, 5, 10.0)
    with tempfile.TemporaryDirectory(prefix="metaemu-node-bench-") as tmp, simulated_node(Path(tmp)) as bench:
        result = {"command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
                  "throughput": throughput(bench, Path(tmp), runs=runs, run_s=run_s), "flood": flood(bench, flood_s)}
    print(json.dumps(result, indent=2))
    if not args.quick:
        (ROOT / "benchmarks/node_load_results.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
