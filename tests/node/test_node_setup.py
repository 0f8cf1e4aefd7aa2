"""``metaemu node-setup`` and the interception rules on a simulated node (issue #4; SEC-01, SEC-03,
SEC-04, SEC-05, SEC-06, SEC-07).

A ``SimulatedNode`` (tests/node/netns.py) holds a node, three pods and a "cloud" whose
169.254.169.254 stands in for the real metadata server. An HTTP responder bound to the node-local
address stands in for the agent; both responders answer with the TCP peer they saw, so every test
can tell who answered a pod, and from which address. The real ``node-setup`` command runs in the
node namespace. Tests that need namespaces are skipped unless root with iproute2, iptables and
conntrack; the rule validation and reconciler-loop tests run everywhere, and so do the IPv6 tests
that use ``FakeNetfilter`` instead of the tools. No test sends anything to an IPv6 address: the
IPv6 rules are read back with ``ip6tables-save`` and ``-C``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
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
    InterceptionRule,
    drift,
    flush_conntrack,
    install,
    reconcile,
    remove,
    verify,
)
from metaemu.netfilter import CommandResult, InterceptionError, IPv6Mode, Netfilter, SubprocessRunner
from metaemu.node_setup import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
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


def saved_rules(node: SimulatedNode, command: str = "iptables-save") -> list[str]:
    return [line for line in node.run_in(node.node_ns, command).stdout.splitlines()
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
    assert saved_rules(node, "ip6tables-legacy-save") == IPV6_SAVED_RULES  # SEC-06, same backend

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
    assert saved_rules(node, "ip6tables-save") == []  # SEC-06's IPv6 block too
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
    ({"ipv6_metadata_addresses": ()}, "ipv6_metadata_addresses"),  # SEC-06 needs at least one
    ({"ipv6_metadata_addresses": (METADATA_IP,)}, "ipv6_metadata_addresses"),
    ({"ipv6_metadata_addresses": (f"::ffff:{METADATA_IP}",)}, "ipv6_metadata_addresses"),  # IPv4 on the wire
])
def test_invalid_rules_are_configuration_errors(fields: dict[str, object], key: str) -> None:
    base: dict[str, object] = {"target_address": NODE_IP, "target_port": AGENT_PORT, "pod_interfaces": ("veth+",)}

    with pytest.raises(ConfigError) as raised:
        InterceptionRule(**{**base, **fields})  # type: ignore[arg-type]

    assert raised.value.key == key


def test_node_setup_exits_2_on_a_configuration_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--to", "127.0.0.1:8080", "--pod-interface", "veth+"], environ={}) == EXIT_CONFIG
    assert main([], environ={"METAEMU_POD_INTERFACES": "veth+"}) == EXIT_CONFIG  # no target
    assert main(list(SETUP_ARGS), environ={"METAEMU_IPV6": "yes"}) == EXIT_CONFIG
    assert main([*SETUP_ARGS, "--iptables", "xtables-nft-multi"], environ={}) == EXIT_CONFIG  # no ip6 twin
    assert "configuration error" in capsys.readouterr().err


@pytest.mark.parametrize(("returncode", "stderr", "deleted"), [
    (0, "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted.\n", 2),
    (1, "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n", 0),  # its "nothing matched"
])
def test_flush_conntrack_reports_deleted_entries(returncode: int, stderr: str, deleted: int) -> None:
    nf = Netfilter(ipv6=IPv6Mode.OFF, runner=ScriptedRunner(returncode, stderr))

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


# -- IPv6 metadata addresses (SEC-06) ---------------------------------------------------------

JUMP = '-m comment --comment "metaemu node-setup: pod metadata traffic" -j METAEMU-METADATA'
REFUSE = ('-m comment --comment "metaemu node-setup: pods reach the metadata address only through the agent" '
          "-j REJECT --reject-with")
#: ``ip6tables-save``'s rules after installing ``RULE``, as the real tool prints them.
IPV6_SAVED_RULES = [
    *[f"-A {chain} -d {address}/128 -i vethpod+ {JUMP}"
      for chain in ("INPUT", "FORWARD") for address in ("fd20:ce::254", "fd00:ec2::254")],
    f"-A METAEMU-METADATA -p tcp {REFUSE} tcp-reset",
    f"-A METAEMU-METADATA {REFUSE} icmp6-port-unreachable",
]
BUILTIN_CHAINS = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}
CONNTRACK_NOTHING = "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"

needs_ip6tables = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "ip6tables", "conntrack"))
    or not os.path.exists("/proc/net/if_inet6"),
    reason="needs root, an IPv6 kernel, iproute2, iptables, ip6tables and conntrack")


class FakeNetfilter:
    """iptables and ip6tables of any backend, and conntrack, without the tools: tables live in
    memory per command; ``*-save`` prints them, ``*-restore`` applies the part of its language
    metaemu writes (a table at a time, all or nothing), ``-C`` looks for the rule's text, and
    ``test -e /proc/net/if_inet6`` answers ``has_ipv6``. Every command named in ``broken`` exits 4,
    as a tool that cannot reach the kernel does. Every call is recorded in ``calls``."""

    def __init__(self, *, has_ipv6: bool = True, broken: frozenset[str] = frozenset()) -> None:
        self.has_ipv6, self.broken = has_ipv6, broken
        self.tables: dict[tuple[str, str], dict[str, list[str]]] = {}  # (iptables command, table) -> chains
        self.calls: list[tuple[str, ...]] = []
        self.payloads: dict[str, list[str]] = {}  # restore command -> its inputs

    def chains(self, command: str, table: str) -> dict[str, list[str]]:
        return self.tables.setdefault((command, table), {c: [] for c in BUILTIN_CHAINS[table]})

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        args = tuple(argv)
        self.calls.append(args)
        name = args[0]
        command = name.removesuffix("-save").removesuffix("-restore")
        if command in self.broken:
            return CommandResult(argv=args, returncode=4, stdout="", stderr=f"{name}: cannot initialize\n")
        if name == "test":
            return CommandResult(argv=args, returncode=0 if self.has_ipv6 else 1, stdout="", stderr="")
        if name == "conntrack":
            return CommandResult(argv=args, returncode=1, stdout="", stderr=CONNTRACK_NOTHING)
        if name.endswith("-save"):
            return CommandResult(argv=args, returncode=0, stdout=self._save(command, args[2]), stderr="")
        if name.endswith("-restore"):
            self.payloads.setdefault(name, []).append(stdin or "")
            return CommandResult(argv=args, returncode=self._restore(command, stdin or ""), stdout="", stderr="")
        table, chain, spec = args[4], args[6], " ".join(f'"{t}"' if " " in t else t for t in args[7:])  # -C
        return CommandResult(argv=args, returncode=0 if spec in self.chains(command, table).get(chain, []) else 1,
                             stdout="", stderr="")

    def _save(self, command: str, table: str) -> str:
        chains = self.chains(command, table)
        return "\n".join([f"*{table}", *[f":{c} - [0:0]" for c in chains],
                          *[f"-A {c} {r}" for c, rules in chains.items() for r in rules], "COMMIT", ""])

    def _restore(self, command: str, payload: str) -> int:
        before = copy.deepcopy(self.tables)
        chains: dict[str, list[str]] = {}
        try:
            for line in payload.splitlines():
                op, _, rest = line.partition(" ")
                if line.startswith("*"):
                    chains = self.chains(command, line[1:])
                elif line.startswith(":"):
                    chains[line[1:].split()[0]] = []
                elif op == "-A":
                    chain, _, rule = rest.partition(" ")
                    chains[chain].append(rule)
                elif op == "-I":
                    chain, position, rule = rest.split(" ", 2)
                    chains[chain].insert(int(position) - 1, rule)
                elif op == "-D":
                    chain, _, rule = rest.partition(" ")
                    chains[chain].remove(rule)
                elif op == "-X":
                    del chains[rest]
        except (KeyError, ValueError):
            self.tables = before
            return 1
        return 0

    def ipv6_commands(self) -> set[str]:
        return {a[0] for a in self.calls if a[0].startswith("ip6tables") or "ipv6" in a}


@pytest.fixture
def root_logging() -> Iterator[None]:
    """``main`` points the root logger at the test's stderr; afterwards it is put back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_sec06_ip6tables_gets_a_filter_table_block_of_the_ipv6_metadata_addresses_and_no_dnat() -> None:
    tools = FakeNetfilter()

    install(RULE, netfilter=Netfilter(runner=tools))

    assert tools.payloads["ip6tables-restore"] == ["\n".join([
        "*filter",
        ":METAEMU-METADATA - [0:0]",
        f"-A METAEMU-METADATA -p tcp {REFUSE} tcp-reset",
        f"-A METAEMU-METADATA {REFUSE} icmp6-port-unreachable",
        *[f"-I {chain} 1 -d {address}/128 -i vethpod+ {JUMP}"
          for chain in ("FORWARD", "INPUT") for address in ("fd00:ec2::254", "fd20:ce::254")],
        "COMMIT", ""])]
    assert [f"-A {c} {r}" for c, rules in tools.chains("ip6tables", "filter").items() for r in rules] == \
        IPV6_SAVED_RULES
    assert ("ip6tables", "nat") not in tools.tables  # the agent listens on IPv4 only: blocked, not redirected
    assert "DNAT" in tools.payloads["iptables-restore"][0]  # IPv4 as before


@pytest.mark.parametrize(("iptables", "ip6tables"), [
    ("iptables", "ip6tables"), ("iptables-legacy", "ip6tables-legacy"), ("iptables-nft", "ip6tables-nft"),
    ("/usr/sbin/iptables-nft", "/usr/sbin/ip6tables-nft"),
])
def test_sec06_the_ipv6_commands_are_the_iptables_backends_twins(iptables: str, ip6tables: str) -> None:
    tools = FakeNetfilter()
    nf = Netfilter(iptables=iptables, runner=tools)

    install(RULE, netfilter=nf)

    assert verify(RULE, netfilter=nf)
    assert {a[0] for a in tools.calls if "ip6" in a[0]} == {ip6tables, f"{ip6tables}-save", f"{ip6tables}-restore"}


IPV6_UNIT_DRIFTS: dict[str, tuple[Callable[[dict[str, list[str]]], object], list[str]]] = {
    "chain missing": (lambda t: t.pop("METAEMU-METADATA"), ["IPv6 filter chain METAEMU-METADATA is missing"]),
    "refusal modified": (lambda t: t["METAEMU-METADATA"].__setitem__(0, t["METAEMU-METADATA"][0].replace(
        "tcp-reset", "icmp6-adm-prohibited")), ["IPv6 filter chain METAEMU-METADATA has a modified rule"]),
    "jump moved down": (lambda t: t["INPUT"].insert(0, "-j ACCEPT"),
                        ["IPv6 filter INPUT: jumps to metaemu chains at positions [1, 2], expected [0, 1]"]),
    "jump deleted": (lambda t: t["FORWARD"].pop(1),
                     ["IPv6 filter FORWARD: jumps to metaemu chains at positions [0], expected [0, 1]",
                      "IPv6 filter FORWARD has a modified jump"]),
    "jump retargeted": (lambda t: t["FORWARD"].__setitem__(0, t["FORWARD"][0].replace("::254/", "::253/")),
                        ["IPv6 filter FORWARD has a modified jump"]),
}


def ours(rules: list[str]) -> list[str]:
    return [r for r in rules if "METAEMU" in r]


@pytest.mark.parametrize(("change", "problems"), IPV6_UNIT_DRIFTS.values(), ids=IPV6_UNIT_DRIFTS.keys())
def test_sec06_drift_in_the_ipv6_rules_is_reported_and_repaired(
        change: Callable[[dict[str, list[str]]], object], problems: list[str]) -> None:
    tools = FakeNetfilter()
    nf = Netfilter(runner=tools)
    install(RULE, netfilter=nf)
    ipv4 = copy.deepcopy({k: v for k, v in tools.tables.items() if k[0] == "iptables"})
    change(tools.chains("ip6tables", "filter"))

    assert drift(RULE, netfilter=nf) == problems
    assert reconcile(RULE, netfilter=nf) is True

    assert drift(RULE, netfilter=nf) == []
    assert ours([f"-A {c} {r}" for c, rules in tools.chains("ip6tables", "filter").items() for r in rules]) == \
        IPV6_SAVED_RULES
    assert {k: v for k, v in tools.tables.items() if k[0] == "iptables"} == ipv4


def test_sec06_install_is_idempotent_and_remove_clears_both_families() -> None:
    tools = FakeNetfilter()
    nf = Netfilter(runner=tools)
    install(RULE, netfilter=nf)
    once = copy.deepcopy(tools.tables)

    install(RULE, netfilter=nf)
    install(RULE, netfilter=nf)

    assert tools.tables == once
    assert remove(netfilter=nf) is True
    assert all(rules == [] for chains in tools.tables.values() for rules in chains.values())
    assert set(tools.chains("ip6tables", "filter")) == set(BUILTIN_CHAINS["filter"])
    assert remove(netfilter=nf) is False


def test_sec06_conntrack_is_flushed_for_the_ipv6_metadata_addresses_too() -> None:
    tools = FakeNetfilter()

    assert flush_conntrack(RULE, netfilter=Netfilter(runner=tools)) == 0

    assert [a for a in tools.calls if a[0] == "conntrack"] == [
        ("conntrack", "-D", "-p", "tcp", "--orig-dst", METADATA_IP, "--orig-port-dst", "80"),
        ("conntrack", "-D", "-f", "ipv6", "--orig-dst", "fd20:ce::254"),
        ("conntrack", "-D", "-f", "ipv6", "--orig-dst", "fd00:ec2::254"),
    ]


def log_lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_sec06_a_kernel_without_ipv6_is_skipped_with_a_log_line(
        capsys: pytest.CaptureFixture[str], root_logging: None) -> None:
    tools = FakeNetfilter(has_ipv6=False, broken=frozenset({"ip6tables"}))

    assert main(list(SETUP_ARGS), environ={}, runner=tools) == EXIT_OK
    assert main([*SETUP_ARGS, "--check"], environ={}, runner=tools) == EXIT_OK
    assert main(["--uninstall"], environ={}, runner=tools) == EXIT_OK

    assert tools.ipv6_commands() == set()
    logs = log_lines(capsys.readouterr().err)
    assert any(str(line["msg"]).startswith("the kernel has no IPv6") for line in logs)
    assert [line["families"] for line in logs if "families" in line] == ["ipv4"]


@pytest.mark.parametrize(("args", "environ", "has_ipv6", "code"), [
    ((), {}, True, EXIT_FAILED),  # auto on a kernel with IPv6: fail closed
    (("--ipv6", "require"), {}, False, EXIT_FAILED),
    ((), {"METAEMU_IPV6": "require"}, True, EXIT_FAILED),
    ((), {}, False, EXIT_OK),  # auto without IPv6: no pod can send IPv6
    (("--ipv6", "off"), {"METAEMU_IPV6": "require"}, True, EXIT_OK),  # the flag wins over the environment
], ids=["auto", "require-flag", "require-env", "auto-no-ipv6", "off"])
def test_sec06_a_failing_ip6tables_fails_node_setup_unless_ipv6_is_absent_or_off(
        args: tuple[str, ...], environ: dict[str, str], has_ipv6: bool, code: int,
        capsys: pytest.CaptureFixture[str], root_logging: None) -> None:
    tools = FakeNetfilter(has_ipv6=has_ipv6, broken=frozenset({"ip6tables"}))

    assert main([*SETUP_ARGS, *args], environ=environ, runner=tools) == code

    logs = log_lines(capsys.readouterr().err)
    if code == EXIT_FAILED:
        assert "ip6tables-save -t filter failed" in str(logs[-1]["error"])
    elif "off" in args:
        assert logs[0]["level"] == "warning" and "IPv6 interception is off" in str(logs[0]["msg"])


def test_sec06_check_fails_on_ipv6_drift_until_node_setup_repairs_it(
        capsys: pytest.CaptureFixture[str], root_logging: None) -> None:
    tools = FakeNetfilter()
    check = [*SETUP_ARGS, "--check"]
    assert main(list(SETUP_ARGS), environ={}, runner=tools) == EXIT_OK
    assert main(check, environ={}, runner=tools) == EXIT_OK

    tools.chains("ip6tables", "filter")["FORWARD"].clear()

    assert main(check, environ={}, runner=tools) == EXIT_FAILED
    assert "IPv6 filter FORWARD has no jump to metaemu chains" in capsys.readouterr().err
    assert main([*check, "--ipv6", "off"], environ={}, runner=tools) == EXIT_OK  # IPv4 is intact
    assert main(list(SETUP_ARGS), environ={}, runner=tools) == EXIT_OK
    assert main(check, environ={}, runner=tools) == EXIT_OK


def test_sec06_the_agent_reconciler_checks_ipv6_by_default() -> None:
    tools = FakeNetfilter(broken=frozenset({"ip6tables"}))

    with pytest.raises(InterceptionError, match="ip6tables-save"):
        reconcile(RULE, netfilter=Netfilter(runner=tools))  # as the agent's DEFAULT_NETFILTER would


def ip6tables(node: SimulatedNode, *args: str) -> None:
    node.run_in(node.node_ns, "ip6tables", "-w", "5", *args)


@needs_ip6tables
def test_sec06_node_setup_installs_the_ipv6_block_check_verifies_it_and_uninstall_removes_it(
        node: SimulatedNode) -> None:
    for _ in range(2):
        assert node_setup(node, *SETUP_ARGS).returncode == 0

    assert saved_rules(node, "ip6tables-save") == IPV6_SAVED_RULES  # the real tool agrees with FakeNetfilter
    assert node_setup(node, *SETUP_ARGS, "--check").returncode == 0
    ip6tables(node, "-D", "FORWARD", "2")
    done = node_setup(node, *SETUP_ARGS, "--check")
    assert done.returncode == 1 and "IPv6 filter FORWARD" in done.stderr
    assert node_setup(node, *SETUP_ARGS).returncode == 0
    assert node_setup(node, *SETUP_ARGS, "--check").returncode == 0

    assert node_setup(node, "--uninstall").returncode == 0
    assert saved_rules(node, "ip6tables-save") == [] and saved_rules(node) == []


IPV6_DRIFTS: dict[str, Sequence[Sequence[str]]] = {
    "jump deleted": [["-D", "FORWARD", "2"]],
    "block flushed": [["-F", "METAEMU-METADATA"]],
    "accept inserted above": [["-I", "INPUT", "1", "-d", "fd20:ce::254", "-j", "ACCEPT"]],
    "refusal weakened": [["-R", "METAEMU-METADATA", "2", "-j", "REJECT", "--reject-with", "icmp6-adm-prohibited"]],
    "chain deleted": [["-D", "INPUT", "1"], ["-D", "INPUT", "1"], ["-D", "FORWARD", "1"], ["-D", "FORWARD", "1"],
                      ["-F", "METAEMU-METADATA"], ["-X", "METAEMU-METADATA"]],
}


@needs_ip6tables
@pytest.mark.parametrize("edits", IPV6_DRIFTS.values(), ids=IPV6_DRIFTS.keys())
def test_sec06_reconcile_repairs_drift_in_the_real_ip6tables(node: SimulatedNode,
                                                             edits: Sequence[Sequence[str]]) -> None:
    nf = netfilter(node)
    install(RULE, netfilter=nf)
    for change in edits:
        ip6tables(node, *change)

    assert [p for p in drift(RULE, netfilter=nf) if not p.startswith("IPv6 ")] == []
    assert not verify(RULE, netfilter=nf)
    assert reconcile(RULE, netfilter=nf) is True

    assert verify(RULE, netfilter=nf)
    assert reconcile(RULE, netfilter=nf) is False
    assert ours(saved_rules(node, "ip6tables-save")) == IPV6_SAVED_RULES


@needs_ip6tables
async def test_sec06_reconciler_restores_a_deleted_ipv6_rule_and_counts_the_repair(node: SimulatedNode) -> None:
    registry, clock, stop = CollectorRegistry(), FakeClock(), asyncio.Event()
    nf = netfilter(node)
    install(RULE, netfilter=nf)
    ip6tables(node, "-D", "INPUT", "1")
    task = asyncio.create_task(interception_reconciler(RULE, clock=clock, stop_event=stop, interval_s=30,
                                                       metrics=create_interception_metrics(registry), netfilter=nf))

    await until(lambda: clock.pending_sleepers == 1)
    assert sample(registry, "metaemu_interception_reconciled_total") == 1
    assert saved_rules(node, "ip6tables-save") == IPV6_SAVED_RULES
    ip6tables(node, "-R", "METAEMU-METADATA", "1", "-p", "tcp", "-j", "ACCEPT")
    clock.advance(30)
    await until(lambda: sample(registry, "metaemu_interception_reconciled_total") == 2)
    await until(lambda: clock.pending_sleepers == 1)

    stop.set()
    await asyncio.wait_for(task, timeout=30)
    assert sample(registry, "metaemu_interception_rule_present") == 1
    assert saved_rules(node, "ip6tables-save") == IPV6_SAVED_RULES
