"""``metaemu node-setup`` and the interception rules on a simulated node (issue #4; SEC-01, SEC-03,
SEC-04, SEC-05, SEC-06, SEC-07).

A ``SimulatedNode`` (tests/node/netns.py) holds a node, three pods and a "cloud" whose
169.254.169.254 stands in for the real metadata server. An HTTP responder bound to the node-local
address stands in for the agent; both responders answer with the TCP peer they saw, so every test
can tell who answered a pod, and from which address. The real ``node-setup`` command runs in the
node namespace. Tests that need namespaces are skipped unless root with iproute2, iptables and
conntrack; the rule validation and reconciler-loop tests run everywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from metaemu.errors import ConfigError
from metaemu.interception import (
    CommandResult,
    InterceptionError,
    InterceptionRule,
    Netfilter,
    SubprocessRunner,
    drift,
    flush_conntrack,
    install,
    reconcile,
    verify,
)
from metaemu.node_setup import (
    EXIT_CONFIG,
    build_parser,
    create_interception_metrics,
    interception_reconciler,
    main,
    rule_from_args,
)
from metaemu.testing.fake_clock import FakeClock
from tests.node.netns import METADATA_IP, NODE_IP, KeepAliveClient, Responder, SimulatedNode

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "conntrack")),
    reason="needs root, iproute2, iptables and conntrack to build a simulated node")

AGENT_PORT = 8080
RULE = InterceptionRule(target_address=NODE_IP, target_port=AGENT_PORT, pod_interfaces=("vethpod+",))
SETUP_ARGS = ("--to", f"{NODE_IP}:{AGENT_PORT}", "--pod-interface", "vethpod+")
METADATA_URL = f"http://{METADATA_IP}/computeMetadata/v1/"


@pytest.fixture
def node() -> Iterator[SimulatedNode]:
    with SimulatedNode(pods=3) as simulated:
        yield simulated


@pytest.fixture
def real_mds(node: SimulatedNode, tmp_path: Path) -> Responder:
    return node.start_responder(node.cloud_ns, name="real-mds", address=METADATA_IP, ports=(80, 443, 8080),
                                log_dir=tmp_path)


@pytest.fixture
def agent(node: SimulatedNode, tmp_path: Path) -> Responder:
    return node.start_responder(node.node_ns, name="agent", address=NODE_IP, ports=(AGENT_PORT,), log_dir=tmp_path)


def netfilter(node: SimulatedNode) -> Netfilter:
    return Netfilter(runner=SubprocessRunner(prefix=node.exec_prefix(node.node_ns)))


def node_setup(node: SimulatedNode, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command, as the init container runs it, in the node namespace."""
    return node.run_in(node.node_ns, sys.executable, "-m", "metaemu.node_setup", *args, check=False,
                       timeout_s=60)


def iptables(node: SimulatedNode, *args: str) -> None:
    node.run_in(node.node_ns, "iptables", "-w", "5", *args)


def saved_rules(node: SimulatedNode) -> list[str]:
    return [line for line in node.run_in(node.node_ns, "iptables-save").stdout.splitlines()
            if line.startswith("-A")]


# -- the redirect ----------------------------------------------------------------------------


@needs_netns
def test_pods_reach_the_agent_with_their_own_source_address_after_node_setup(
        node: SimulatedNode, real_mds: Responder, agent: Responder) -> None:
    before = node.http_get(node.pod_ns(1), METADATA_URL)
    assert before.server == "real-mds"  # the simulated node routes to the "real" server until set up

    done = node_setup(node, *SETUP_ARGS)

    assert done.returncode == 0, done.stderr
    for i in node.pods:
        got = node.http_get(node.pod_ns(i), METADATA_URL)
        assert got.server == "agent" and got.body is not None
        assert got.body["peer"] == node.pod_ip(i)  # what node mode identifies pods by
        assert got.body["host"] == METADATA_IP
    assert agent.peers() == [node.pod_ip(i) for i in node.pods]
    assert real_mds.peers() == [node.pod_ip(1)]  # only the request made before node-setup


@needs_netns
@pytest.mark.parametrize("url", ["http://metadata.google.internal/computeMetadata/v1/",
                                 "http://metadata/computeMetadata/v1/",
                                 f"http://[::ffff:{METADATA_IP}]/computeMetadata/v1/"])
def test_metadata_names_and_the_ipv4_mapped_literal_reach_the_agent_sec_06(
        node: SimulatedNode, real_mds: Responder, agent: Responder, url: str) -> None:
    install(RULE, netfilter=netfilter(node))

    got = node.http_get(node.pod_ns(2), url)  # names resolve through the pod's hostAliases entry

    assert got.server == "agent" and got.body is not None and got.body["peer"] == node.pod_ip(2)
    assert real_mds.peers() == []


@needs_netns
def test_pods_added_after_install_and_a_reused_ip_are_redirected_with_their_own_address(
        node: SimulatedNode, agent: Responder) -> None:
    install(RULE, netfilter=netfilter(node))
    new = node.add_pod()
    reused = node.reuse_ip(1)

    assert node.http_get(node.pod_ns(new), METADATA_URL).body == agent.requests()[-1]
    got = node.http_get(node.pod_ns(reused), METADATA_URL)

    assert got.server == "agent" and got.body is not None
    assert got.body["peer"] == node.pod_ip(reused) == "169.254.20.11"  # the agent's pod watch decides who it is


@needs_netns
def test_host_network_traffic_is_not_redirected(node: SimulatedNode, real_mds: Responder, agent: Responder) -> None:
    install(RULE, netfilter=netfilter(node))

    got = node.http_get(node.node_ns, METADATA_URL)  # a hostNetwork pod is a process in the node namespace

    assert got.server == "real-mds"  # as on GKE: only pod interfaces are intercepted
    assert agent.peers() == []


@needs_netns
def test_a_node_interface_selector_redirects_everything_but_that_interface(
        node: SimulatedNode, real_mds: Responder, agent: Responder) -> None:
    done = node_setup(node, "--to", f"{NODE_IP}:{AGENT_PORT}", "--node-interface", "eth0")

    assert done.returncode == 0, done.stderr
    assert node.http_get(node.pod_ns(3), METADATA_URL).server == "agent"
    assert node.http_get(node.cloud_ns, f"http://{NODE_IP}:{AGENT_PORT}/").error == "refused"  # SEC-07
    assert real_mds.peers() == []


@needs_netns
def test_the_agent_address_can_live_on_a_local_device(node: SimulatedNode, tmp_path: Path) -> None:
    args = ("--to", "169.254.169.252:988", "--pod-interface", "vethpod+", "--local-address-dev", "lo")

    assert [node_setup(node, *args).returncode for _ in range(2)] == [0, 0]
    agent = node.start_responder(node.node_ns, name="agent", address="169.254.169.252", ports=(988,),
                                 log_dir=tmp_path)

    assert node.http_get(node.pod_ns(1), METADATA_URL).server == "agent"
    assert agent.peers() == [node.pod_ip(1)]


# -- fail closed -----------------------------------------------------------------------------


@needs_netns
def test_without_a_running_agent_pods_are_refused_never_answered_by_the_real_server_sec_01_sec_05(
        node: SimulatedNode, real_mds: Responder, tmp_path: Path) -> None:
    assert node_setup(node, *SETUP_ARGS).returncode == 0
    assert node.http_get(node.pod_ns(1), METADATA_URL).error == "refused"  # rule first, agent not up yet

    agent = node.start_responder(node.node_ns, name="agent", address=NODE_IP, ports=(AGENT_PORT,), log_dir=tmp_path)
    assert node.http_get(node.pod_ns(1), METADATA_URL).server == "agent"
    agent.stop()  # SIGTERM, as in a rolling update: nothing is removed

    outcomes = [node.http_get(node.pod_ns(i), METADATA_URL).error for i in node.pods for _ in range(3)]
    assert outcomes == ["refused"] * 9
    assert real_mds.peers() == []
    assert verify(RULE, netfilter=netfilter(node))


@needs_netns
@pytest.mark.parametrize("port", [8080, 443])
def test_other_ports_of_the_metadata_address_are_refused_to_pods_sec_06(
        node: SimulatedNode, real_mds: Responder, agent: Responder, port: int) -> None:
    install(RULE, netfilter=netfilter(node))

    got = node.http_get(node.pod_ns(1), f"http://{METADATA_IP}:{port}/")

    assert got.error == "refused"
    assert real_mds.peers() == [] and agent.peers() == []


@needs_netns
def test_the_agent_port_is_refused_from_off_node_but_open_to_pods_sec_07(
        node: SimulatedNode, agent: Responder) -> None:
    install(RULE, netfilter=netfilter(node))

    from_outside = node.http_get(node.cloud_ns, f"http://{NODE_IP}:{AGENT_PORT}/")
    from_pod = node.http_get(node.pod_ns(2), f"http://{NODE_IP}:{AGENT_PORT}/")

    assert from_outside.error == "refused"
    assert from_pod.server == "agent"
    assert agent.peers() == [node.pod_ip(2)]


def tracked_metadata_connections(node: SimulatedNode) -> int:
    listing = node.run_in(node.node_ns, "conntrack", "-L", "-p", "tcp", "--orig-dst", METADATA_IP,
                          "--orig-port-dst", "80")
    match = re.search(r"(\d+) flow entries have been shown", listing.stderr)
    assert match is not None, listing.stderr
    return int(match.group(1))


@needs_netns
def test_a_connection_opened_before_node_setup_cannot_reach_the_real_server_sec_03(
        node: SimulatedNode, real_mds: Responder, agent: Responder) -> None:
    client = keepalive_client_of_the_real_server(node)

    done = node_setup(node, *SETUP_ARGS)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.splitlines()[-1])["conntrack_flushed"] == 1
    assert tracked_metadata_connections(node) == 0
    assert client.get("/after") == {"error": "ConnectionResetError"}  # dead, not served by the real server
    assert [r["path"] for r in real_mds.requests()] == ["/before"]
    assert node.http_get(node.pod_ns(1), METADATA_URL).server == "agent"


@needs_netns
def test_without_the_flush_the_block_rule_still_refuses_an_old_connection_sec_03(
        node: SimulatedNode, real_mds: Responder) -> None:
    client = keepalive_client_of_the_real_server(node)

    install(RULE, netfilter=netfilter(node))  # no conntrack flush: the old entry keeps its destination

    assert tracked_metadata_connections(node) == 1
    assert client.get("/after") == {"error": "ConnectionResetError"}  # REJECTed in FORWARD, defence in depth
    assert [r["path"] for r in real_mds.requests()] == ["/before"]


def keepalive_client_of_the_real_server(node: SimulatedNode) -> KeepAliveClient:
    """A pod's keep-alive connection to 169.254.169.254:80, answered by the real server, on a node
    that tracks connections (real nodes do; kube-proxy installs this very rule)."""
    iptables(node, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    client = node.keepalive_client(node.pod_ns(1), METADATA_IP)
    assert client.get("/before") == {"server": "real-mds"}
    assert tracked_metadata_connections(node) == 1
    return client


# -- idempotence, verification, drift --------------------------------------------------------


@needs_netns
def test_install_is_idempotent(node: SimulatedNode) -> None:
    for _ in range(3):
        install(RULE, netfilter=netfilter(node))
    assert node_setup(node, *SETUP_ARGS).returncode == 0

    rules = saved_rules(node)

    assert sum("-j DNAT" in r for r in rules) == 1
    assert sum(r.startswith("-A PREROUTING") for r in rules) == 1
    assert len(rules) == 10  # nat: 1 jump, 1 DNAT; filter: 3 jumps, 2 rejects, 3 guard rules
    assert drift(RULE, netfilter=netfilter(node)) == []


@needs_netns
def test_install_replaces_the_rules_of_an_earlier_configuration(node: SimulatedNode) -> None:
    install(InterceptionRule(target_address=NODE_IP, target_port=9999, pod_interfaces=("cali+", "vethpod+")),
            netfilter=netfilter(node))

    install(RULE, netfilter=netfilter(node))

    assert verify(RULE, netfilter=netfilter(node))
    assert not any("cali+" in r or "9999" in r for r in saved_rules(node))


DRIFTS: dict[str, Sequence[Sequence[str]]] = {
    "dnat deleted": [["-t", "nat", "-D", "METAEMU-METADATA", "1"]],
    "dnat retargeted": [["-t", "nat", "-R", "METAEMU-METADATA", "1", "-p", "tcp", "-m", "tcp", "--dport", "80",
                         "-j", "DNAT", "--to-destination", f"{NODE_IP}:9999"]],
    "jump deleted": [["-t", "nat", "-D", "PREROUTING", "1"]],
    "chain deleted": [["-t", "nat", "-D", "PREROUTING", "1"], ["-t", "nat", "-F", "METAEMU-METADATA"],
                      ["-t", "nat", "-X", "METAEMU-METADATA"]],
    "accept inserted above": [["-t", "nat", "-I", "PREROUTING", "1", "-d", METADATA_IP, "-j", "ACCEPT"]],
    "duplicate jump": [["-t", "nat", "-A", "PREROUTING", "-i", "vethpod+", "-d", METADATA_IP,
                        "-j", "METAEMU-METADATA"]],
    "foreign rule in our chain": [["-t", "nat", "-I", "METAEMU-METADATA", "1", "-j", "RETURN"]],
    "block flushed": [["-F", "METAEMU-METADATA"]],
    "forward jump moved down": [["-I", "FORWARD", "1", "-j", "ACCEPT"]],
    "guard reordered": [["-D", "METAEMU-AGENT", "1"], ["-A", "METAEMU-AGENT", "-i", "lo", "-j", "RETURN"]],
}


@needs_netns
@pytest.mark.parametrize("edits", DRIFTS.values(), ids=DRIFTS.keys())
def test_reconcile_detects_and_repairs_drift_in_one_call_sec_04(
        node: SimulatedNode, real_mds: Responder, agent: Responder, edits: Sequence[Sequence[str]]) -> None:
    nf = netfilter(node)
    install(RULE, netfilter=nf)
    for edit in edits:
        iptables(node, *edit)

    assert not verify(RULE, netfilter=nf)
    assert node_setup(node, *SETUP_ARGS, "--check").returncode == 1
    assert reconcile(RULE, netfilter=nf) is True

    assert verify(RULE, netfilter=nf)
    assert node_setup(node, *SETUP_ARGS, "--check").returncode == 0
    assert reconcile(RULE, netfilter=nf) is False
    assert node.http_get(node.pod_ns(1), METADATA_URL).server == "agent"
    assert node.http_get(node.pod_ns(1), f"http://{METADATA_IP}:8080/").error == "refused"
    assert real_mds.peers() == []


@needs_netns
def test_the_legacy_backend_gets_the_same_rules_and_repairs(node: SimulatedNode, real_mds: Responder,
                                                            agent: Responder) -> None:
    legacy = Netfilter(iptables="iptables-legacy", runner=SubprocessRunner(prefix=node.exec_prefix(node.node_ns)))
    assert node_setup(node, *SETUP_ARGS, "--iptables", "iptables-legacy").returncode == 0
    assert node.http_get(node.pod_ns(1), METADATA_URL).server == "agent"
    assert verify(RULE, netfilter=legacy) and not verify(RULE, netfilter=netfilter(node))  # nft tables untouched

    node.run_in(node.node_ns, "iptables-legacy", "-w", "5", "-t", "nat", "-R", "METAEMU-METADATA", "1", "-p", "tcp",
                "--dport", "80", "-j", "DNAT", "--to-destination", f"{NODE_IP}:9999")

    assert reconcile(RULE, netfilter=legacy) is True
    assert reconcile(RULE, netfilter=legacy) is False
    assert node.http_get(node.pod_ns(2), METADATA_URL).server == "agent"
    assert real_mds.peers() == []


@needs_netns
def test_uninstall_removes_every_rule(node: SimulatedNode, real_mds: Responder) -> None:
    assert node_setup(node, *SETUP_ARGS).returncode == 0

    assert node_setup(node, "--uninstall").returncode == 0

    assert saved_rules(node) == []
    assert node.http_get(node.pod_ns(1), METADATA_URL).server == "real-mds"  # why the agent never does this


# -- the agent's reconciler -------------------------------------------------------------------


async def until(predicate: Callable[[], bool], *, timeout_s: float = 30) -> None:
    """Wait for the reconciler's worker thread (real iptables subprocesses), bounded. Polls: the
    state lives in a thread and a FakeClock, neither of which can set an event for us."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    return 0.0 if value is None else value


@needs_netns
async def test_reconciler_restores_deleted_rules_and_counts_each_repair_sec_04(node: SimulatedNode) -> None:
    registry, clock, stop = CollectorRegistry(), FakeClock(), asyncio.Event()
    nf = netfilter(node)
    install(RULE, netfilter=nf)
    iptables(node, "-t", "nat", "-D", "PREROUTING", "1")
    task = asyncio.create_task(interception_reconciler(RULE, clock=clock, stop_event=stop, interval_s=30,
                                                       metrics=create_interception_metrics(registry), netfilter=nf))

    await until(lambda: clock.pending_sleepers == 1)
    assert sample(registry, "metaemu_interception_reconciled_total") == 1
    assert sample(registry, "metaemu_interception_rule_present") == 1
    iptables(node, "-t", "nat", "-F", "METAEMU-METADATA")
    clock.advance(30)
    await until(lambda: sample(registry, "metaemu_interception_reconciled_total") == 2)
    await until(lambda: clock.pending_sleepers == 1)
    clock.advance(30)  # nothing drifted: checked, not counted
    await until(lambda: clock.pending_sleepers == 1)

    stop.set()
    await asyncio.wait_for(task, timeout=30)
    assert sample(registry, "metaemu_interception_reconciled_total") == 2
    assert verify(RULE, netfilter=nf)


class ScriptedRunner:
    """Answers every command with one result: a tool's output without the tool."""

    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode, self.stderr = returncode, stderr

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        return CommandResult(argv=tuple(argv), returncode=self.returncode, stdout="", stderr=self.stderr)


XTABLES_LOCKED = ScriptedRunner(4, "Another app is currently holding the xtables lock.")


async def test_reconciler_survives_failures_counts_them_and_backs_off() -> None:
    registry, clock, stop = CollectorRegistry(), FakeClock(), asyncio.Event()
    task = asyncio.create_task(interception_reconciler(RULE, clock=clock, stop_event=stop, interval_s=30,
                                                       metrics=create_interception_metrics(registry),
                                                       netfilter=Netfilter(runner=XTABLES_LOCKED)))
    for delay in (1, 2, 4):  # RECONCILE_RETRY_INITIAL_S, doubling
        await until(lambda: clock.pending_sleepers == 1)
        clock.advance(delay)
    await until(lambda: sample(registry, "metaemu_interception_reconcile_errors_total") == 4)

    assert not task.done()
    assert sample(registry, "metaemu_interception_rule_present") == 0
    stop.set()
    await asyncio.wait_for(task, timeout=10)


# -- configuration and tool output ------------------------------------------------------------


@pytest.mark.parametrize(("fields", "key"), [
    ({"target_address": "127.0.0.1"}, "target_address"),  # would need route_localnet (CVE-2020-8558, SEC-07)
    ({"target_address": "0.0.0.0"}, "target_address"),
    ({"target_address": METADATA_IP}, "target_address"),
    ({"target_address": "fd00::1"}, "target_address"),
    ({"target_port": 0}, "target_port"),
    ({"pod_interfaces": ()}, "pod_interfaces"),
    ({"node_interface": "eth0"}, "pod_interfaces"),  # both selectors
    ({"pod_interfaces": ("veth+; rm",)}, "pod_interfaces"),
    ({"pod_interfaces": ("a-very-long-name0+",)}, "pod_interfaces"),
    ({"pod_interfaces": (), "node_interface": "eth+"}, "node_interface"),
])
def test_invalid_rules_are_configuration_errors(fields: dict[str, object], key: str) -> None:
    base: dict[str, object] = {"target_address": NODE_IP, "target_port": AGENT_PORT, "pod_interfaces": ("veth+",)}

    with pytest.raises(ConfigError) as raised:
        InterceptionRule(**{**base, **fields})  # type: ignore[arg-type]

    assert raised.value.key == key


def test_node_setup_exits_2_on_a_configuration_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--to", "127.0.0.1:8080", "--pod-interface", "veth+"], environ={}) == EXIT_CONFIG
    assert main([], environ={"METAEMU_POD_INTERFACES": "veth+"}) == EXIT_CONFIG  # no target
    assert "configuration error" in capsys.readouterr().err


@pytest.mark.parametrize(("returncode", "stderr", "deleted"), [
    (0, "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted.\n", 2),
    (1, "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n", 0),  # its "nothing matched"
])
def test_flush_conntrack_reports_deleted_entries(returncode: int, stderr: str, deleted: int) -> None:
    nf = Netfilter(runner=ScriptedRunner(returncode, stderr))

    assert flush_conntrack(RULE, netfilter=nf) == deleted


def test_flush_conntrack_raises_when_the_tool_fails() -> None:
    nf = Netfilter(runner=ScriptedRunner(1, "conntrack v1.4.7 (conntrack-tools): Operation not permitted\n"))

    with pytest.raises(InterceptionError, match="Operation not permitted"):
        flush_conntrack(RULE, netfilter=nf)


@pytest.mark.parametrize(("argv", "environ", "expected"), [
    ([], {"METAEMU_INTERCEPT_TO": f"{NODE_IP}:8080", "METAEMU_POD_INTERFACES": "veth+, cali+"},
     InterceptionRule(target_address=NODE_IP, target_port=8080, pod_interfaces=("veth+", "cali+"))),
    (["--node-interface", "eth0"], {"METAEMU_INTERCEPT_TO": f"{NODE_IP}:988", "METAEMU_POD_INTERFACES": "veth+"},
     InterceptionRule(target_address=NODE_IP, target_port=988, node_interface="eth0")),
    (["--to", "169.254.169.252:988", "--pod-interface", "eni+"], {"METAEMU_INTERCEPT_TO": f"{NODE_IP}:1"},
     InterceptionRule(target_address="169.254.169.252", target_port=988, pod_interfaces=("eni+",))),
])
def test_the_rule_comes_from_flags_then_the_environment(argv: list[str], environ: dict[str, str],
                                                         expected: InterceptionRule) -> None:
    assert rule_from_args(build_parser().parse_args(argv), environ) == expected
