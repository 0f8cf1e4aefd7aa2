"""Node mode end to end on a simulated node (issues #4, #10): network namespaces for a node and three
pods joined by veth pairs on link-local addresses, the real `metaemu node-setup` rules in the node
namespace, metaemu in node mode there against the real kube-apiserver of the test bed (a second
instance of it on the node namespace's own loopback, sharing the session's etcd: the node cannot
reach the host's loopback) with a Google stand-in that trusts the cluster's real JWKS
(metaemu.testing.node_world --kubeconfig), and real google-auth in each pod calling plain http://169.254.169.254
with NO override variables. Each pod gets exactly its own service account's token; an unknown
address and a host-network caller get none; deletion and address reuse are handled; stopping
metaemu never lets a pod reach anything else at 169.254.169.254 (SEC-01, SEC-05, SEC-08, SEC-10,
SEC-14).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kube.agent import agent_token, shipped_config, unique
from tests.kube.cluster import KubeCluster, stop_process
from tests.kube.simulated import rules_and_apiserver
from tests.node.netns import NODE_IP, SimulatedNode

pytestmark = [pytest.mark.kube, pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(c) for c in ("ip", "iptables", "conntrack")),
    reason="needs root, iproute2, iptables and conntrack to build a simulated node")]

AGENT = f"{NODE_IP}:8080"
CONTROL = 8090
STARTUP_TAINT = {"key": "metaemu.dev/agent-not-ready", "value": "true", "effect": "NoSchedule"}
GSA = {1: "one@demo-project.iam.gserviceaccount.com", 2: "two@demo-project.iam.gserviceaccount.com"}
#: node-setup's log (JSON lines) for each simulated node, by its namespace.
SETUP_LOGS: dict[str, str] = {}
CLIENT = """
import json, google.auth, google.auth.transport.requests as r
try:
    creds, project = google.auth.default()
    creds.refresh(r.Request())
    print(json.dumps({"token": creds.token, "email": creds.service_account_email, "project": project}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


@dataclass
class Sim:
    node: SimulatedNode
    agent: subprocess.Popen[str]
    kube: KubeCluster
    name: str  # the Node's name in the API
    ns: dict[int, str]  # pod i's namespace: unique in the session's cluster

    def pod(self, i: int, namespace: str, name: str, sa: str, gsa: str | None, *, ip: str | None = None) -> None:
        """A Running pod of service account ``sa`` on this node at pod ``i``'s address (a kubelet's
        report, through the status subresource); with ``gsa``, annotated and granted at Google."""
        annotations = {"iam.gke.io/gcp-service-account": gsa} if gsa else None
        self.kube.service_account(namespace, sa, annotations=annotations)
        if gsa:
            control(self.node, "POST", "/grant", {"gsa": gsa, "namespace": namespace, "service_account": sa})
        self.kube.pod(namespace, name, node=self.name, service_account=sa, ip=ip or self.node.pod_ip(i),
                      host_ip=NODE_IP)


@pytest.fixture
def simnode(cluster: KubeCluster, tmp_path: Path) -> Iterator[Sim]:
    with simulated_node(cluster, tmp_path) as sim:
        yield sim


@contextlib.contextmanager
def simulated_node(cluster: KubeCluster, tmp_path: Path, *agent_args: str,
                   cloud: Callable[[SimulatedNode], object] | None = None) -> Iterator[Sim]:
    """A simulated node with the rules installed, three pods in the API and the agent ready
    (``agent_args`` added to node_world's command line); ``cloud`` starts what the cloud namespace
    serves once it exists, before the agent starts (tests/kube/test_passthrough_node.py's IMDS)."""
    name = unique("simnode")
    cluster.node(name, taints=[STARTUP_TAINT])
    token_file = tmp_path / "agent.token"
    token_file.write_text(agent_token(cluster, name))
    kubeconfig = cluster.kubeconfig(tmp_path / "agent.kubeconfig", token_file=token_file,
                                    server=f"https://127.0.0.1:{cluster.port}")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(cluster.jwks()))
    with SimulatedNode(pods=3) as node:
        if cloud is not None:
            cloud(node)
        with rules_and_apiserver(cluster, node, to=AGENT) as setup_log:
            SETUP_LOGS[node.node_ns] = setup_log
            agent = node.popen_in(node.node_ns, sys.executable, "-m", "metaemu.testing.node_world", "--listen", AGENT,
                                  "--control-port", str(CONTROL), "--host-address", NODE_IP, "--node", name,
                                  "--intercept-pod-interface", "vethpod+", "--kubeconfig", str(kubeconfig),
                                  "--cluster-jwks", str(jwks), "--audience", str(shipped_config()["node"]["audience"]),
                                  *agent_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert agent.stdout is not None
                assert agent.stdout.readline().strip() == "READY", agent.stderr.read() if agent.stderr else ""
                sim = Sim(node, agent, cluster, name, {i: unique(f"ns{i}") for i in (1, 2, 3)})
                for i in (1, 2, 3):  # pods 1 and 2 annotated with their own Google accounts, 3 not
                    sim.pod(i, sim.ns[i], f"pod{i}", f"ksa{i}", GSA.get(i))
                yield sim
            finally:
                stop_process(agent)


def control(node: SimulatedNode, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    script = ("import json, sys, urllib.request as u; "
              f"req = u.Request('http://127.0.0.1:{CONTROL}' + sys.argv[1], method=sys.argv[2], "
              "data=sys.argv[3].encode() or None, headers={'Content-Type': 'application/json'}); "
              "print(u.urlopen(req, timeout=10).read().decode())")
    out = node.run_in(node.node_ns, sys.executable, "-c", script, path, method, json.dumps(body) if body else "")
    return json.loads(out.stdout)


def client_in(node: SimulatedNode, ns: str) -> dict[str, Any]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "GCE_METADATA_DETECT_RETRIES": "1"}
    assert not any(k.startswith("GCE_METADATA_HOST") or k == "GCE_METADATA_IP" for k in env)  # no overrides
    out = subprocess.run([*node.exec_prefix(ns), sys.executable, "-c", CLIENT], env=env, capture_output=True,
                         text=True, timeout=60)
    result: dict[str, Any] = json.loads(out.stdout or '{"error": "no output"}')
    return result


def raw_get(node: SimulatedNode, ns: str, path: str) -> tuple[int | None, str]:
    """(status, body) of GET http://169.254.169.254 + path with the flavor header; None: no answer."""
    script = ("import sys, urllib.request as u, urllib.error as e\n"
              "try:\n"
              "    r = u.urlopen(u.Request('http://169.254.169.254' + sys.argv[1], "
              "headers={'Metadata-Flavor': 'Google'}), timeout=5)\n"
              "    print(r.status); print(r.read().decode())\n"
              "except e.HTTPError as x:\n"
              "    print(x.code); print(x.read().decode())\n"
              "except Exception as x:\n"
              "    print('none'); print(type(x).__name__)\n")
    out = node.run_in(ns, sys.executable, "-c", script, path, check=False)
    status, _, body = out.stdout.partition("\n")
    return (None if status == "none" else int(status)), body.removesuffix("\n")  # print() adds one


def wait_until(predicate: Any, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)  # the agent's watch catching up, in another process; bounded


def test_each_pod_gets_exactly_its_own_identity(simnode: Sim) -> None:
    node = simnode.node
    seen = {}
    for i in (1, 2, 3):
        out = client_in(node, node.pod_ns(i))
        assert "error" not in out, out
        assert out["project"] == "demo-project"
        info = control(node, "GET", f"/token-info?token={out['token']}")
        seen[i] = (out["email"], info["email"], info["principal"])
    assert seen[1][:2] == (GSA[1], GSA[1])
    assert seen[2][:2] == (GSA[2], GSA[2])
    assert seen[3][0] == "demo-project.svc.id.goog"  # not annotated: the federated principal (GKE-05)
    assert seen[3][2].endswith(f"/subject/system:serviceaccount:{simnode.ns[3]}:ksa3")


def test_unknown_address_and_host_network_get_no_token(
        simnode: Sim) -> None:
    node = simnode.node
    stranger = node.add_pod()  # a namespace with an address no pod has in the API
    status, body = raw_get(node, node.pod_ns(stranger), "/computeMetadata/v1/instance/service-accounts/default/token")
    assert status == 403
    assert "access_token" not in body
    # A host-network caller: a process in the node namespace, talking to the agent directly.
    host = node.run_in(node.node_ns, sys.executable, "-c",
                       "import urllib.request as u, urllib.error as e\n"
                       f"try: u.urlopen(u.Request('http://{AGENT}/computeMetadata/v1/instance/service-accounts/"
                       "default/token', headers={'Metadata-Flavor': 'Google'}), timeout=5)\n"
                       "except e.HTTPError as x: print(x.code)\n", check=False)
    assert host.stdout.strip() == "403"


def test_deleted_pod_loses_its_identity_and_a_reused_address_gets_the_new_pods(
        simnode: Sim) -> None:
    node = simnode.node
    path = "/computeMetadata/v1/instance/service-accounts/default/email"
    assert raw_get(node, node.pod_ns(1), path) == (200, GSA[1])
    simnode.kube.delete_pod(simnode.ns[1], "pod1")
    wait_until(lambda: raw_get(node, node.pod_ns(1), path)[0] == 403, "pod1 refused after its deletion")
    simnode.pod(1, unique("ns9"), "newcomer", "ksa9", "nine@demo-project.iam.gserviceaccount.com")
    wait_until(lambda: raw_get(node, node.pod_ns(1), path) == (200, "nine@demo-project.iam.gserviceaccount.com"),
               "the new pod on the reused address gets its own identity")


def test_stopping_metaemu_never_exposes_anything_else(
        simnode: Sim) -> None:
    node, agent = simnode.node, simnode.agent
    agent.terminate()
    assert agent.wait(timeout=15) == 0
    for i in (1, 2):
        status, detail = raw_get(node, node.pod_ns(i), "/computeMetadata/v1/instance/service-accounts/default/token")
        assert status is None, (status, detail)  # refused: the rules stay, nothing answers (SEC-05)


def test_sec37_sec40_agent_keeps_the_rules_and_reports_them_in_readiness(
        simnode: Sim) -> None:
    node = simnode.node
    metrics = node.run_in(node.node_ns, sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
                          "'http://127.0.0.1:8081/metrics', timeout=5).read().decode())").stdout
    assert "metaemu_interception_rule_present 1.0" in metrics  # SEC-40
    ready = node.run_in(node.node_ns, sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
                        "'http://127.0.0.1:8081/readyz', timeout=5).status)").stdout
    assert ready.strip() == "200"  # SEC-37: the pod watch synced and the rules are in place


def test_sec02_rules_then_watch_sync_then_the_startup_taint_is_removed(
        simnode: Sim) -> None:
    """The node registered with metaemu's startup taint; each event's own timestamp: node-setup's
    "installed and verified" log line, metaemu's pod watch sync, the API server applying the patch."""
    node = simnode.node
    [installed] = [json.loads(line) for line in SETUP_LOGS[node.node_ns].splitlines()
                   if line.startswith("{") and json.loads(line).get("msg") == "interception installed and verified"]
    rule_installed = dt.datetime.fromisoformat(installed["time"]).timestamp()
    def taints() -> list[dict[str, str]]:
        return list(simnode.kube.ok("GET", f"/api/v1/nodes/{simnode.name}")["spec"].get("taints", []))

    wait_until(lambda: all(t["key"] != STARTUP_TAINT["key"] for t in taints()), "the startup taint to be removed")
    # The real server's TaintNodesByCondition added its not-ready taint to the new node: it stays.
    assert taints() == [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]
    synced_at = control(node, "GET", "/state")["watch_synced_at"]
    # When the API server applied the agent's patch: its managedFields entry (second resolution).
    node_object = simnode.kube.ok("GET", f"/api/v1/nodes/{simnode.name}")
    [patched] = [dt.datetime.fromisoformat(f["time"]).timestamp() for f in node_object["metadata"]["managedFields"]
                 if f["operation"] == "Update" and f.get("subresource") is None]
    assert rule_installed < synced_at
    assert int(synced_at) <= patched  # the patch came after the sync, to the second the server records
    # ... and from then on a pod scheduled here is served (its own identity, as above).
    out = client_in(node, node.pod_ns(1))
    assert out.get("email") == GSA[1], out
