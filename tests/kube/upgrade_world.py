"""The world of the node-mode upgrade tests and benchmark (issue #11): a simulated node
(tests/node/netns.py) with the real interception rules, a second kube-apiserver of the test bed on
its loopback, the Google stand-in served over HTTP there (``node_world --google-port``) and any
number of real ``metaemu serve`` agents sharing it, each with its own config and admin socket;
pods' client loops (tests/node/metadata_loop.py) measure what the pods saw.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metaemu.testing.world import PROJECT_ID, PROJECT_NUMBER
from tests.kube.agent import agent_token, shipped_config, unique
from tests.kube.cluster import KubeCluster, stop_process
from tests.kube.simulated import rules_and_apiserver
from tests.kube.test_simulated_node import CONTROL, control
from tests.node.netns import NODE_IP, SimulatedNode

AGENT = f"{NODE_IP}:8080"
GOOGLE_PORT = 8091
LOOP = Path(__file__).resolve().parents[1] / "node" / "metadata_loop.py"
#: Bounds for processes starting in the simulated node (an agent's start is about a second).
START_S = 30.0
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"


@dataclass
class Upgrade:
    node: SimulatedNode
    kube: KubeCluster
    name: str
    dir: Path
    kubeconfig: Path
    gsa: dict[int, str] = field(default_factory=dict)
    agents: list[subprocess.Popen[str]] = field(default_factory=list)

    def start_agent(self, n: int, *, rate_limit_per_second: float | None = None,
                    cpu: int | None = None) -> subprocess.Popen[str]:
        """``metaemu serve`` number ``n`` (its own config and admin socket; pinned to ``cpu``), its
        log to a file."""
        node_config: dict[str, Any] = {"name": self.name, "audience": shipped_config()["node"]["audience"],
                                       "kubeconfig": str(self.kubeconfig), "host_addresses": [NODE_IP]}
        if rate_limit_per_second is not None:
            node_config.update(rate_limit_per_second=rate_limit_per_second,
                               rate_limit_burst=int(2 * rate_limit_per_second))
        config = {"mode": "node", "listen": AGENT, "admin_listen": "127.0.0.1:8081",
                  "admin_socket": str(self.socket(n)), "profile": "gke", "project_id": PROJECT_ID,
                  "numeric_project_id": PROJECT_NUMBER, "node": node_config,
                  "endpoints": {"sts": f"http://127.0.0.1:{GOOGLE_PORT}/v1/token",
                                "iam_credentials": f"http://127.0.0.1:{GOOGLE_PORT}/v1"}}
        path = self.dir / f"agent{n}.yaml"
        path.write_text(yaml.safe_dump(config))
        pin = ("taskset", "-c", str(cpu)) if cpu is not None else ()
        agent = self.node.popen_in(self.node.node_ns, *pin, sys.executable, "-m", "metaemu", "serve", "--config",
                                   str(path), stderr=self.log(n).open("w"))
        self.agents.append(agent)
        return agent

    def socket(self, n: int) -> Path:
        return self.dir / f"agent{n}.sock"

    def log(self, n: int) -> Path:
        return self.dir / f"agent{n}.log"

    def log_messages(self, n: int) -> list[str]:
        return [json.loads(line)["msg"] for line in self.log(n).read_text().splitlines() if line.startswith("{")]

    def probe(self, n: int) -> bool:
        """The DaemonSet's readiness probe, as kubelet runs it in agent ``n``'s pod."""
        return self.node.run_in(self.node.node_ns, sys.executable, "-m", "metaemu", "probe", "ready", "--socket",
                                str(self.socket(n)), check=False).returncode == 0

    def wait_ready(self, n: int, agent: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + START_S
        while not self.probe(n):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent {n} not ready: {self.log(n).read_text()[-3000:]}")
            time.sleep(0.1)  # kubelet's probe period, shortened; bounded

    def pod(self, i: int) -> None:
        """A Running pod at pod ``i``'s address with its own annotated, granted service account."""
        namespace, sa = unique(f"up{i}"), f"ksa{i}"
        self.gsa[i] = f"{namespace}@{PROJECT_ID}.iam.gserviceaccount.com"
        self.kube.service_account(namespace, sa, annotations={"iam.gke.io/gcp-service-account": self.gsa[i]})
        control(self.node, "POST", "/grant", {"gsa": self.gsa[i], "namespace": namespace, "service_account": sa})
        self.kube.pod(namespace, f"pod{i}", node=self.name, service_account=sa, ip=self.node.pod_ip(i),
                      host_ip=NODE_IP)

    def loops(self, rate_per_s: float, max_s: float, *, cpu: int | None = None) -> dict[int, subprocess.Popen[str]]:
        """Each pod's client loop, started and past its first success."""
        pin = ("taskset", "-c", str(cpu)) if cpu is not None else ()
        loops = {i: self.node.popen_in(self.node.pod_ns(i), *pin, sys.executable, str(LOOP), str(rate_per_s),
                                       str(max_s), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                 for i in self.node.pods}
        for i, loop in loops.items():
            if loop.stdout is None or loop.stdout.readline().strip() != "STARTED":
                raise RuntimeError(f"pod {i}'s loop never got a token")
        return loops

    def calls(self) -> dict[str, int]:
        found: dict[str, int] = control(self.node, "GET", "/calls")
        return found


def finish(loops: dict[int, subprocess.Popen[str]]) -> dict[int, dict[str, Any]]:
    results = {}
    for i, loop in loops.items():
        out, _ = loop.communicate("stop\n", timeout=60)
        results[i] = json.loads(out.splitlines()[-1])
    return results


@contextlib.contextmanager
def upgrade_world(cluster: KubeCluster, tmp_path: Path, *, pods: int = 3) -> Iterator[Upgrade]:
    name = unique("upnode")
    cluster.node(name)
    token_file = tmp_path / "agent.token"
    token_file.write_text(agent_token(cluster, name))
    kubeconfig = cluster.kubeconfig(tmp_path / "agent.kubeconfig", token_file=token_file,
                                    server=f"https://127.0.0.1:{cluster.port}")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(cluster.jwks()))
    with SimulatedNode(pods=pods) as node, rules_and_apiserver(cluster, node, to=AGENT):
        google = node.popen_in(node.node_ns, sys.executable, "-m", "metaemu.testing.node_world",
                               "--google-port", str(GOOGLE_PORT), "--control-port", str(CONTROL),
                               "--cluster-jwks", str(jwks), "--audience", shipped_config()["node"]["audience"],
                               stdout=subprocess.PIPE)
        if google.stdout is None or google.stdout.readline().strip() != "READY":
            raise RuntimeError("the Google stand-in did not start")
        world = Upgrade(node=node, kube=cluster, name=name, dir=tmp_path, kubeconfig=kubeconfig)
        try:
            yield world
        finally:
            for agent in world.agents:
                stop_process(agent)


def foreign_tokens(world: Upgrade, results: dict[int, dict[str, Any]]) -> list[tuple[int, Any]]:
    """Tokens a pod got that are not its own Google account's (by the stand-in's records)."""
    found = []
    for i, result in results.items():
        for token in result["tokens"]:
            info = control(world.node, "GET", f"/token-info?token={token}")
            if info["email"] != world.gsa[i]:
                found.append((i, info))
    return found


def served(world: Upgrade, n: int) -> float:
    """Token requests agent ``n`` answered 200, from its /metrics over its own admin socket."""
    script = ("import http.client, socket, sys\n"
              "c = http.client.HTTPConnection('localhost')\n"
              "c.sock = socket.socket(socket.AF_UNIX); c.sock.connect(sys.argv[1])\n"
              "c.request('GET', '/metrics'); print(c.getresponse().read().decode())\n")
    text = world.node.run_in(world.node.node_ns, sys.executable, "-c", script, str(world.socket(n))).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("metaemu_requests_total{") and '/token"' in line and 'code="200"' in line)
