"""Node-mode load on a simulated node (issue #4; SEC-34): one pod floods metaemu while a neighbour
makes steady requests. Shows the per-pod rate limit answering the flood with 429 and the
well-behaved pod's latency staying low.

Needs root (network namespaces, iptables). Run: ``.venv/bin/python benchmarks/node_load.py [--quick]``.
Everything is bounded: fixed durations, fixed request counts per worker, 5 s socket timeouts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.node.netns import NODE_IP, SimulatedNode  # noqa: E402

AGENT = f"{NODE_IP}:8080"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
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


def run(duration_s: float, flooders: int) -> dict[str, Any]:
    with SimulatedNode(pods=1 + flooders) as node:
        setup = node.run_in(node.node_ns, sys.executable, "-m", "metaemu", "node-setup", "--to", AGENT,
                            "--pod-interface", "vethpod+", check=False, timeout_s=60)
        assert setup.returncode == 0, setup.stderr
        agent = node.popen_in(node.node_ns, sys.executable, "-m", "metaemu.testing.node_world", "--listen", AGENT,
                              "--control-port", "8090", "--host-address", NODE_IP, stdout=subprocess.PIPE)
        assert agent.stdout is not None
        assert agent.stdout.readline().strip() == "READY"
        for i in range(1, flooders + 2):
            body = json.dumps({"namespace": f"ns{i}", "name": f"pod{i}", "service_account": f"ksa{i}",
                               "ip": node.pod_ip(i), "gsa": f"sa{i}@demo-project.iam.gserviceaccount.com"})
            node.run_in(node.node_ns, sys.executable, "-c", "import sys, urllib.request as u; u.urlopen(u.Request("
                        "'http://127.0.0.1:8090/pods', data=sys.argv[1].encode(), method='POST'), timeout=10)", body)
        steady_requests = int(duration_s * 10) + 5  # 10 requests/s, well under the 20/s per-pod limit
        quiet = summary(load(node, 1, duration_s=duration_s, interval_s=0.1, max_requests=steady_requests))
        results: dict[int, dict[str, Any]] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, load(
            node, i, duration_s=duration_s, interval_s=0.0, max_requests=100_000))) for i in range(2, flooders + 2)]
        for t in threads:
            t.start()
        neighbour = summary(load(node, 1, duration_s=duration_s, interval_s=0.1, max_requests=steady_requests))
        for t in threads:
            t.join(timeout=duration_s + 60)
        agent.terminate()
        agent.wait(timeout=15)
        return {"duration_s": duration_s, "flooding_pods": flooders, "neighbour_alone": quiet,
                "neighbour_during_flood": neighbour, "flooders": [summary(results[i]) for i in sorted(results)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="3 s instead of 10 s")
    p.add_argument("--flooders", type=int, default=2)
    args = p.parse_args()
    result = run(3.0 if args.quick else 10.0, args.flooders)
    print(json.dumps(result, indent=2))
    if not args.quick:
        (ROOT / "benchmarks/node_load_results.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
