"""``metaemu doctor`` in node mode (issue #14): the interception-rules check against the real
iptables in a network namespace this test creates (tests/node/netns.py), and ``--pod`` against the
real kube-apiserver of the test bed (no kubelet: pods and their status are set through the API),
with the Google stand-in trusting the cluster's real issuer and JWKS."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaemu.clock import SystemClock
from metaemu.config import parse_config
from metaemu.doctor.node import check_interception, interception_rule
from metaemu.doctor.report import Report
from metaemu.interception import InterceptionRule, install
from metaemu.netfilter import Netfilter, SubprocessRunner
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from tests.credentials.support import serve
from tests.doctor.support import Outcome, run_doctor
from tests.kube.cluster import ISSUER, KubeCluster
from tests.node.netns import NODE_IP, SimulatedNode

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables")),
    reason="needs root, iproute2 and iptables to build a network namespace")

PORT = 8080
AUDIENCE = ("//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/pool/"
            "providers/cluster")
GSA = "web@my-project.iam.gserviceaccount.com"


def node_config(tmp_path: Path, *, name: str, kubeconfig: Path, google_url: str,
                interfaces: list[str] | None = None) -> dict[str, Any]:
    return {"mode": "node", "listen": f"{NODE_IP}:{PORT}", "admin_listen": "127.0.0.1:0",
            "project_id": "my-project", "endpoints": {"sts": f"{google_url}/v1/token",
                                                      "iam_credentials": f"{google_url}/v1"},
            "node": {"name": name, "audience": AUDIENCE, "kubeconfig": str(kubeconfig), "startup_taint": "",
                     "intercept_pod_interfaces": interfaces or []}}


@pytest.fixture
def sim() -> Iterator[SimulatedNode]:
    with SimulatedNode(pods=1) as node:
        yield node


def netns_runner(sim: SimulatedNode) -> SubprocessRunner:
    return SubprocessRunner(prefix=sim.exec_prefix(sim.node_ns))


@needs_netns
def test_the_rules_check_passes_when_installed_and_fails_when_a_rule_is_put_above_them(
        sim: SimulatedNode, tmp_path: Path) -> None:
    netfilter = Netfilter(runner=netns_runner(sim))
    rule = InterceptionRule(target_address=NODE_IP, target_port=PORT, pod_interfaces=("vethpod+",))
    missing = Report(mode="node")
    assert not check_interception(missing, rule, netfilter=netfilter)
    assert missing.checks[0].diagnosis == "interception.drift"
    install(rule, netfilter=netfilter)
    present = Report(mode="node")
    assert check_interception(present, rule, netfilter=netfilter)
    assert present.checks[0].status == "ok"
    # Another agent inserts itself first: pods' traffic could be accepted before the redirect (SEC-04).
    sim.run_in(sim.node_ns, "iptables", "-w", "5", "-t", "nat", "-I", "PREROUTING", "1", "-j", "ACCEPT")
    moved = Report(mode="node")
    assert not check_interception(moved, rule, netfilter=netfilter)
    check = moved.checks[0]
    assert any("PREROUTING: jumps to metaemu chains at positions [1]" in p for p in check.details.values())
    assert check.fix is not None and check.fix.startswith(
        f"metaemu node-setup --to {NODE_IP}:{PORT} --pod-interface vethpod+")


def test_without_known_pod_interfaces_the_rules_are_a_warning_not_a_failure(tmp_path: Path) -> None:
    raw = node_config(tmp_path, name="n", kubeconfig=tmp_path / "k", google_url="http://g.test")
    config = parse_config(raw, hostname="n", base_dir=tmp_path)
    assert interception_rule(config, pod_interfaces=(), node_interface=None) is None
    report = Report(mode="node")
    assert check_interception(report, None, netfilter=Netfilter())
    assert report.checks[0].status == "warn"


def test_unreadable_rules_point_at_node_setup_check(tmp_path: Path) -> None:
    # iptables that cannot run (the capability-free serving container): a warning with where to look.
    rule = InterceptionRule(target_address=NODE_IP, target_port=PORT, pod_interfaces=("veth+",))
    report = Report(mode="node")
    broken = Netfilter(iptables=str(tmp_path / "iptables"), runner=SubprocessRunner())
    assert check_interception(report, rule, netfilter=broken)
    assert report.checks[0].diagnosis == "interception.unreadable"
    assert report.checks[0].fix == ("kubectl -n metaemu-system exec ds/metaemu -c node-setup -- "
                                    "metaemu node-setup --check")


@pytest.fixture
async def google(cluster: KubeCluster) -> AsyncIterator[tuple[FakeGoogle, str]]:
    google = FakeGoogle()  # real time, as the API server's tokens carry
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=cluster.jwks()))
    async with serve(google.app()) as url:
        yield google, url


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


async def doctor_for_pod(cluster: KubeCluster, tmp_path: Path, google_url: str, *, node: str, pod: str,
                         sim: SimulatedNode | None = None) -> Outcome:
    kubeconfig = cluster.kubeconfig(tmp_path / "admin.kubeconfig")
    raw = node_config(tmp_path, name=node, kubeconfig=kubeconfig, google_url=google_url,
                      interfaces=["vethpod+"] if sim else None)
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(raw))
    return await run_doctor(["--config", str(config), "--pod", pod], clock=SystemClock(),
                            runner=netns_runner(sim) if sim else None)


def workload(cluster: KubeCluster, google: FakeGoogle, *, node: str, grant: bool = True) -> tuple[str, str]:
    namespace = unique("apps")
    cluster.node(node)
    cluster.service_account(namespace, "web", annotations={"iam.gke.io/gcp-service-account": GSA})
    google.add_service_account(GSA)
    if grant:
        google.grant(GSA, google.principal_for(AUDIENCE, f"system:serviceaccount:{namespace}:web"))
    cluster.pod(namespace, "web", node=node, service_account="web", ip="169.254.40.7", host_ip="169.254.40.1")
    return namespace, f"{namespace}/web"


@needs_netns
async def test_a_served_pod_on_a_node_with_its_rules_gets_a_working_chain_and_exit_0(
        cluster: KubeCluster, google: tuple[FakeGoogle, str], sim: SimulatedNode, tmp_path: Path) -> None:
    fake, url = google
    node = unique("node")
    namespace, pod = workload(cluster, fake, node=node)
    install(InterceptionRule(target_address=NODE_IP, target_port=PORT, pod_interfaces=("vethpod+",)),
            netfilter=Netfilter(runner=netns_runner(sim)))
    outcome = await doctor_for_pod(cluster, tmp_path, url, node=node, pod=pod, sim=sim)
    assert outcome.status == 0, outcome.text
    assert outcome.statuses == {"config": "ok", "interception rules": "ok", "pod": "ok", "subject token": "ok",
                                "sts exchange": "ok", "impersonation": "ok"}
    assert outcome.check("pod")["details"] == {"ip": "169.254.40.7", "service account": "web",
                                               "iam.gke.io/gcp-service-account": GSA}
    subject = outcome.check("subject token")["details"]
    assert (subject["issuer"], subject["subject"], subject["audience"]) == (
        ISSUER, f"system:serviceaccount:{namespace}:web", AUDIENCE)


async def test_a_pod_of_another_node_is_named_with_the_node_it_runs_on(
        cluster: KubeCluster, google: tuple[FakeGoogle, str], tmp_path: Path) -> None:
    fake, url = google
    elsewhere = unique("node")
    _, pod = workload(cluster, fake, node=elsewhere)
    here = unique("node")
    cluster.node(here)
    outcome = await doctor_for_pod(cluster, tmp_path, url, node=here, pod=pod)
    assert outcome.status == 1
    assert outcome.failed["summary"] == f"the pod runs on node {elsewhere}, this agent serves {here}"
    assert outcome.statuses["subject token"] == "skip"


async def test_a_missing_pod_is_not_found(cluster: KubeCluster, google: tuple[FakeGoogle, str],
                                          tmp_path: Path) -> None:
    _, url = google
    outcome = await doctor_for_pod(cluster, tmp_path, url, node=unique("node"), pod="default/nobody")
    assert outcome.failed["summary"] == "no pod default/nobody"


async def test_a_pod_whose_account_lacks_the_grant_gets_its_own_principal_to_grant(
        cluster: KubeCluster, google: tuple[FakeGoogle, str], tmp_path: Path) -> None:
    fake, url = google
    node = unique("node")
    namespace, pod = workload(cluster, fake, node=node, grant=False)
    outcome = await doctor_for_pod(cluster, tmp_path, url, node=node, pod=pod)
    failed = outcome.failed
    assert (failed["name"], failed["diagnosis"]) == ("impersonation", "iam.workload_identity_user_missing")
    principal = fake.principal_for(AUDIENCE, f"system:serviceaccount:{namespace}:web")
    assert failed["fix"].endswith(f"--role=roles/iam.workloadIdentityUser --member={principal}")
    assert outcome.check("interception rules")["status"] == "warn"  # no interfaces given: not checked
