"""A new pod's first token request on a simulated node, with Google 300 ms away (issue #11).

The node agent (``metaemu.testing.node_world``: metaemu in node mode against the test bed's real
kube-apiserver, the Google stand-in in process with ``--google-latency-seconds 0.3`` on every STS
and IAM Credentials answer, so an exchange costs 600 ms of upstream time) runs in a simulated node's
namespace (tests/node/netns.py) behind node-setup's real interception rule, pinned to the server
core. New pods, each with its own Kubernetes service account annotated with its own Google account
(so each needs a fresh exchange), are created through the API still without an address; then, one
pod every ``stagger_s``, the benchmark sets a pod's status with its address through the API, as
kubelet does once the sandbox is up (there is no kubelet). The moment that PATCH returns is the
pod's "address assigned". A client already waiting in the pod's own network namespace (pinned to the
load core, like the API server, etcd and this script) then makes the pod's first request, a fresh
connection to ``http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token``
with ``Metadata-Flavor: Google``:

1. ``after_1s``: 1 s after the address was assigned; its latency (target: p99 < 10 ms);
2. ``at_once``: as soon as the address was assigned; errors (target: 0) and latency.

Every token served is checked with the Google stand-in: it must be the pod's own Google account's.
The agent's counters (prefetches, token cache, pod lookups) are reported per phase.

Needs root (namespaces, iptables) and the test bed's binaries (built by ``make test``/``make
kube-testenv``, or ``scripts/kube-testenv.sh``). Run: ``.venv/bin/python benchmarks/first_request.py
[--quick] [--output FILE] [--check]``; a full run writes ``benchmarks/first_request_results.json``.
Bounded: a fixed number of pods, every wait has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import select
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks``, ``metaemu`` and ``tests`` importable
    sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.kube.agent import GSA_ANNOTATION, agent_token, shipped_config, unique  # noqa: E402
from tests.kube.cluster import KubeCluster, stop_process  # noqa: E402
from tests.kube.session import running_cluster  # noqa: E402
from tests.kube.simulated import rules_and_apiserver  # noqa: E402
from tests.node.netns import NODE_IP, SimulatedNode  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "first_request_results.json"
AGENT = f"{NODE_IP}:8080"
CONTROL = 8090
ADMIN = "127.0.0.1:8081"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
#: Issue #11: "300 ms of injected upstream latency", on each STS and each IAM Credentials call.
GOOGLE_LATENCY_S = 0.3
#: Issue #11: the pods "calling 1 s after their IP is assigned", and the target for them.
CALL_AFTER_S = 1.0
P99_TARGET_MS = 10.0
#: A client's bound on one request: the resolver waits at most 5 s (SEC-09) plus an exchange (0.6 s).
CLIENT_TIMEOUT_S = 15.0
#: Agent start (the node namespace's API server coming up, the watch syncing), and a client's
#: Python start-up: seconds; only a broken run waits them out.
AGENT_READY_S = 90.0
CLIENT_READY_S = 30.0
#: Time for the agent's watches to see a phase's new service accounts and pending pods (events
#: arrive within milliseconds), so a phase starts from a quiet agent.
SETTLE_S = 2.0
#: Agent counters reported per phase; upstream calls by backend show one exchange per pod.
COUNTERS = ("metaemu_pod_prefetches_total", "metaemu_token_cache_total", "metaemu_pod_lookup_total",
            "metaemu_upstream_request_duration_seconds_count")
#: The agent's own time to answer (its request histogram, from the parsed request to the answer).
ANSWER_BUCKETS = "metaemu_request_duration_seconds_bucket"
TOKEN_ROUTE = "/computeMetadata/v1/instance/service-accounts/{account}/token"
#: The client's stages, reported per phase beside the whole request.
STAGES = ("resolve", "connect", "response", "cpu_wait")

#: Runs in a pod's namespace: prints READY, then for each line (a CLOCK_MONOTONIC time, shared by all
#: namespaces) waits until then and makes one request on a fresh connection, as a pod's code would
#: (http.client); prints the outcome with its stages: resolving the host (the process's first
#: getaddrinfo loads its resolver), the TCP connection (through the interception rule), and sending
#: the request until the body is read. The connection resolves the address again (warm by then).
#: ``cpu_wait_s``: how long the client itself waited for its core meanwhile (the kernel's run delay,
#: /proc/self/schedstat), time no server could be blamed for.
_CLIENT = r"""
import http.client, json, socket, sys, time
path, timeout = sys.argv[1], float(sys.argv[2])
def run_delay_s():
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9
print("READY", flush=True)
for line in sys.stdin:
    at = float(line)
    while (left := at - time.monotonic()) > 0:
        time.sleep(left)
    waited = run_delay_s()
    started = time.monotonic()
    out = {"late_s": started - at, "started_monotonic": started}
    try:
        socket.getaddrinfo("169.254.169.254", 80, 0, socket.SOCK_STREAM)
        resolved = time.monotonic()
        c = http.client.HTTPConnection("169.254.169.254", 80, timeout=timeout)
        c.connect()
        connected = time.monotonic()
        c.request("GET", path, headers={"Metadata-Flavor": "Google"})
        r = c.getresponse()
        body = r.read()
        done = time.monotonic()
        out.update(latency_s=done - started, resolve_s=resolved - started, connect_s=connected - resolved,
                   response_s=done - connected, cpu_wait_s=run_delay_s() - waited, status=r.status,
                   body=body.decode(errors="replace")[:4000])
        c.close()
    except Exception as e:
        out.update(latency_s=time.monotonic() - started, error=type(e).__name__)
    print(json.dumps(out), flush=True)
"""

#: Runs in the node's namespace: the control API calls read from stdin ([method, path, body], ...).
_CONTROL = r"""
import json, sys, urllib.request as u
out = []
for method, path, body in json.load(sys.stdin):
    data = json.dumps(body).encode() if body is not None else None
    req = u.Request("http://127.0.0.1:" + sys.argv[1] + path, data=data, method=method,
                    headers={"Content-Type": "application/json"})
    out.append(json.loads(u.urlopen(req, timeout=10).read()))
print(json.dumps(out))
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    pods_per_phase: int
    stagger_s: float  # from one pod's address to the next pod's: a rollout, several in flight at once


FULL = Settings(pods_per_phase=50, stagger_s=0.25)
#: Smoke run (``--quick``, tests/test_benchmark_smoke.py): every code path, figures only indicative.
QUICK = Settings(pods_per_phase=4, stagger_s=0.25)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pod:
    namespace: str
    name: str
    service_account: str
    gsa: str
    ip: str
    pod_ns: str  # its network namespace


@dataclass(frozen=True, slots=True, kw_only=True)
class Cpus:
    server: int | None
    load: int | None

    @classmethod
    def usable(cls) -> Cpus:
        """The first two usable cores (server, load); unpinned when fewer than two."""
        cores = sorted(os.sched_getaffinity(0))
        return cls(server=cores[0], load=cores[1]) if len(cores) >= 2 else cls(server=None, load=None)

    def prefix(self, cpu: int | None) -> tuple[str, ...]:
        return ("taskset", "-c", str(cpu)) if cpu is not None else ()


class PodClient:
    """The ``_CLIENT`` process waiting in one pod's network namespace."""

    def __init__(self, node: SimulatedNode, pod: Pod, cpus: Cpus) -> None:
        self.pod = pod
        self.process = node.popen_in(pod.pod_ns, *cpus.prefix(cpus.load), sys.executable, "-c", _CLIENT, TOKEN_PATH,
                                     str(CLIENT_TIMEOUT_S), stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ready(self) -> None:
        if self._line(CLIENT_READY_S) != "READY":
            raise RuntimeError(f"the client in {self.pod.pod_ns} did not start")

    def fire(self, at: float) -> None:
        """Make the pod's first request at monotonic time ``at`` (at once if it has passed)."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{at!r}\n")
        self.process.stdin.close()

    def outcome(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._line(CLIENT_TIMEOUT_S + 10))
        return result

    def _line(self, timeout_s: float) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            raise RuntimeError(f"the client in {self.pod.pod_ns} did not answer within {timeout_s} s")
        return self.process.stdout.readline().strip()


@dataclass
class Bench:
    kube: KubeCluster
    node: SimulatedNode
    node_name: str
    namespace: str
    cpus: Cpus
    agent_pid: int | None = None
    next_pod: int = 1

    def control(self, calls: list[tuple[str, str, Any]]) -> list[Any]:
        """Calls to node_world's control API (in the node's namespace), in one process."""
        out = self.node.run_in(self.node.node_ns, sys.executable, "-c", _CONTROL, str(CONTROL),
                               input_text=json.dumps(calls), timeout_s=60)
        result: list[Any] = json.loads(out.stdout)
        return result

    def counters(self) -> dict[str, float]:
        """The agent's ``COUNTERS``, one entry per label set, and its token route's answer-time
        buckets (``answer_le_ms=<bound>``)."""
        script = f"import urllib.request as u; print(u.urlopen('http://{ADMIN}/metrics', timeout=10).read().decode())"
        text = self.node.run_in(self.node.node_ns, sys.executable, "-c", script).stdout
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in COUNTERS:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    found[f"{sample.name}{{{labels}}}"] = sample.value
                elif sample.name == ANSWER_BUCKETS and sample.labels.get("route") == TOKEN_ROUTE:
                    bound = float(sample.labels["le"])
                    found[f"answer_le_ms={bound * 1000:g}"] = sample.value
        return found

    def new_pods(self, count: int, prefix: str) -> list[Pod]:
        """``count`` pods of this node, each with its own annotated service account and Google
        account (granted at the stand-in), created without an address (kubelet has not reported one)."""
        pods = []
        for _ in range(count):
            i, self.next_pod = self.next_pod, self.next_pod + 1
            pods.append(Pod(namespace=self.namespace, name=f"{prefix}-{i}", service_account=f"ksa-{prefix}-{i}",
                            gsa=f"sa-{prefix}-{i}@demo-project.iam.gserviceaccount.com", ip=self.node.pod_ip(i),
                            pod_ns=self.node.pod_ns(i)))
        for pod in pods:
            self.kube.service_account(pod.namespace, pod.service_account, annotations={GSA_ANNOTATION: pod.gsa})
        self.control([("POST", "/grant", {"gsa": p.gsa, "namespace": p.namespace, "service_account": p.service_account})
                      for p in pods])
        for pod in pods:
            self.kube.pod(pod.namespace, pod.name, node=self.node_name, service_account=pod.service_account)
        return pods

    def token_emails(self, tokens: list[str]) -> list[str | None]:
        """The Google account the stand-in issued each access token for (None: not one it issued)."""
        infos = self.control([("GET", "/token-info?token=" + urllib.parse.quote(t, safe=""), None) for t in tokens])
        return [info["email"] for info in infos]


@contextlib.contextmanager
def agent(bench: Bench, workdir: Path) -> Iterator[subprocess.Popen[str]]:
    """The node agent in the node's namespace, pinned to the server core; its log in ``workdir``."""
    name, node = bench.node_name, bench.node
    kubeconfig = workdir / "agent.kubeconfig"
    bench.kube.kubeconfig(kubeconfig, token=agent_token(bench.kube, name), server=f"https://127.0.0.1:{bench.kube.port}")
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(bench.kube.jwks()))
    with (workdir / "agent.log").open("w") as log:
        process = node.popen_in(
            node.node_ns, *bench.cpus.prefix(bench.cpus.server), sys.executable, "-m", "metaemu.testing.node_world",
            "--listen", AGENT, "--control-port", str(CONTROL), "--host-address", NODE_IP, "--node", name,
            "--kubeconfig", str(kubeconfig), "--cluster-jwks", str(jwks),
            "--audience", str(shipped_config()["node"]["audience"]), "--google-latency-seconds", str(GOOGLE_LATENCY_S),
            stdout=subprocess.PIPE, stderr=log)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], AGENT_READY_S)
        if not ready or process.stdout.readline().strip() != "READY":
            raise RuntimeError(f"the node agent did not become ready; see {workdir / 'agent.log'}")
        yield process
    finally:
        stop_process(process)


def run_phase(bench: Bench, *, prefix: str, delay_s: float, settings: Settings) -> dict[str, Any]:
    """New pods get their addresses one every ``stagger_s``; each calls ``delay_s`` after its own."""
    pods = bench.new_pods(settings.pods_per_phase, prefix)
    clients = [PodClient(bench.node, pod, bench.cpus) for pod in pods]
    for client in clients:
        client.ready()
    time.sleep(SETTLE_S)
    before, contention = bench.counters(), Contention.now(bench.agent_pid)
    start, patches = time.monotonic(), []
    for k, client in enumerate(clients):
        _sleep_until(start + k * settings.stagger_s)
        patched = time.monotonic()
        pod = client.pod
        bench.kube.pod_status(pod.namespace, pod.name, ip=pod.ip, host_ip=NODE_IP)
        assigned = time.monotonic()  # the API server has the address: the pod's "IP assigned"
        client.fire(assigned + delay_s)
        patches.append(assigned - patched)
    outcomes = [client.outcome() for client in clients]
    time.sleep(2 * GOOGLE_LATENCY_S)  # exchanges the requests did not wait for, to be counted
    after, contended = bench.counters(), contention.since(bench.agent_pid)
    return summarize(bench, pods, outcomes, delay_s=delay_s, patches=patches,
                     counters={k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)},
                     contention=contended)


def summarize(bench: Bench, pods: list[Pod], outcomes: list[dict[str, Any]], *, delay_s: float,
              patches: list[float], counters: dict[str, float], contention: dict[str, float]) -> dict[str, Any]:
    served = [(pod, json.loads(o["body"])["access_token"]) for pod, o in zip(pods, outcomes, strict=True)
              if o.get("status") == 200]
    emails = bench.token_emails([token for _, token in served])
    foreign = sum(1 for (pod, _), email in zip(served, emails, strict=True) if email != pod.gsa)
    latencies_ms = sorted(o["latency_s"] * 1000 for o in outcomes)
    statuses = Counter(str(o.get("status", o.get("error"))) for o in outcomes)
    stages = {stage: _percentiles(sorted(o[f"{stage}_s"] * 1000 for o in outcomes if f"{stage}_s" in o))
              for stage in STAGES}
    answers = {k.removeprefix("answer_le_ms="): v for k, v in counters.items() if k.startswith("answer_le_ms=")}
    return {"call_after_s": delay_s, "requests": len(outcomes), "statuses": dict(statuses),
            "errors": sum(1 for o in outcomes if o.get("status") != 200), "foreign_or_invalid_tokens": foreign,
            **_percentiles(latencies_ms), "stages_ms": stages, "agent_answers_within_ms": answers,
            "client_late_max_ms": round(max(o["late_s"] for o in outcomes) * 1000, 3),
            "status_patch_max_ms": round(max(patches) * 1000, 1), "cpu_contention": contention,
            "agent_counters": {k: v for k, v in counters.items() if not k.startswith("answer_le_ms=")},
            "requests_in_address_order": [{(f"{k.removesuffix('_s')}_ms" if k.endswith("_s") else k):
                                           (round(v * 1000, 3) if k.endswith("_s") else v)
                                           for k, v in o.items() if k != "body"} for o in outcomes]}


def _percentiles(sorted_ms: list[float]) -> dict[str, float | None]:
    if not sorted_ms:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"p50_ms": _rank(sorted_ms, 0.50), "p99_ms": _rank(sorted_ms, 0.99), "max_ms": _rank(sorted_ms, 1.0)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Contention:
    """How busy the machine was during a phase: the share of time some task waited for a CPU
    (/proc/pressure/cpu ``some``) and the agent's own run delay, all its threads (schedstat)."""

    monotonic: float
    pressure_us: int
    agent_run_delay_ns: int

    @classmethod
    def now(cls, agent_pid: int | None) -> Contention:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return cls(monotonic=time.monotonic(), pressure_us=int(some.rpartition("total=")[2]),
                   agent_run_delay_ns=_run_delay_ns(agent_pid))

    def since(self, agent_pid: int | None) -> dict[str, float]:
        later = Contention.now(agent_pid)
        elapsed_s = later.monotonic - self.monotonic
        return {"phase_s": round(elapsed_s, 1),
                "cpu_pressure_some_pct": round((later.pressure_us - self.pressure_us) / 1e4 / elapsed_s, 1),
                "agent_run_delay_ms": round((later.agent_run_delay_ns - self.agent_run_delay_ns) / 1e6, 1)}


def _run_delay_ns(pid: int | None) -> int:
    if pid is None:
        return 0
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[1])
    return total


def _rank(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (with fewer than 100 values, p99 is the maximum)."""
    return round(sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)], 3)


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)


def measure(kube: KubeCluster, workdir: Path, settings: Settings, cpus: Cpus) -> dict[str, Any]:
    """Both phases on a fresh simulated node of ``kube``; the figures as JSON-ready data."""
    name = unique("first-request-node")
    kube.node(name)
    with SimulatedNode(pods=2 * settings.pods_per_phase) as node, rules_and_apiserver(kube, node, to=AGENT):
        bench = Bench(kube=kube, node=node, node_name=name, namespace=unique("first-request"), cpus=cpus)
        with agent(bench, workdir) as agent_process:
            bench.agent_pid = agent_process.pid
            phases = {"after_1s": run_phase(bench, prefix="late", delay_s=CALL_AFTER_S, settings=settings),
                      "at_once": run_phase(bench, prefix="eager", delay_s=0.0, settings=settings)}
    late, eager = phases["after_1s"], phases["at_once"]
    foreign = late["foreign_or_invalid_tokens"] + eager["foreign_or_invalid_tokens"]
    targets = {"after_1s p99 < 10 ms": late["p99_ms"] < P99_TARGET_MS,
               "after_1s errors == 0": late["errors"] == 0, "at_once errors == 0": eager["errors"] == 0,
               "foreign or invalid tokens == 0": foreign == 0}
    return {"settings": {**asdict(settings), "google_latency_s_per_call": GOOGLE_LATENCY_S},
            "phases": phases, "targets": targets, "targets_failed": [t for t, ok in targets.items() if not ok]}


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"first request of a new pod: {s['pods_per_phase']} pods per phase, an address every {s['stagger_s']} s, "
             f"Google {s['google_latency_s_per_call'] * 1000:.0f} ms per STS and per IAM call",
             "", "| phase | requests | errors | p50 ms | p99 ms | max ms | foreign tokens |",
             "|---|---|---|---|---|---|---|"]
    for name, p in result["phases"].items():
        lines.append(f"| {name} | {p['requests']} | {p['errors']} | {p['p50_ms']} | {p['p99_ms']} | {p['max_ms']} "
                     f"| {p['foreign_or_invalid_tokens']} |")
    for name, p in result["phases"].items():
        stages = ", ".join(f"{stage} p50 {v['p50_ms']} / max {v['max_ms']}" for stage, v in p["stages_ms"].items())
        lines.append(f"{name} stages (ms): {stages}; agent's own answer times (ms, cumulative): "
                     + ", ".join(f"<={b}: {int(n)}" for b, n in p["agent_answers_within_ms"].items() if b != "inf"))
        c = p["cpu_contention"]
        lines.append(f"{name} contention: some task waited for a CPU {c['cpu_pressure_some_pct']} % of the "
                     f"{c['phase_s']} s; the agent waited {c['agent_run_delay_ms']} ms for its core")
    lines += ["", "targets: " + ", ".join(f"{t}: {'ok' if ok else 'MISSED'}" for t, ok in result["targets"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="First token request of new pods on a simulated node (issue #11).")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK.pods_per_phase} pods per phase; writes JSON only with --output")
    p.add_argument("--output", type=Path, help=f"JSON results file (default for a full run: {DEFAULT_OUTPUT.name})")
    p.add_argument("--check", action="store_true", help="exit 1 when a figure misses its target")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("first_request.py needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    cpus = Cpus.usable()
    if cpus.load is not None:  # everything but the agent on the load core: the cluster, clients, this script
        os.sched_setaffinity(0, {cpus.load})
    machine = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
               "pinning": f"agent on CPU {cpus.server}; clients, kube-apiserver, etcd, driver on CPU {cpus.load}"
               if cpus.load is not None else "none (fewer than 2 usable CPUs)",
               "load average at start": round(os.getloadavg()[0], 2)}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="metaemu-first-request-") as tmp, \
            running_cluster(Path(tmp) / "kube") as kube:
        result = measure(kube, Path(tmp), QUICK if args.quick else FULL, cpus)
    machine["load average at end"] = round(os.getloadavg()[0], 2)
    result = {"command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
              "mode": "quick" if args.quick else "full", "machine": machine,
              "duration_s": round(time.monotonic() - started, 1), **result}
    print(render(result))
    output: Path | None = args.output or (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {os.path.relpath(output)}")
    return 1 if args.check and result["targets_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
