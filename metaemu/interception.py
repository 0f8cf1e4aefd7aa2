"""Node-mode interception: the netfilter rules that make pods' metadata traffic reach the agent.

Owns the rule set (for the node's ``iptables``/``ip6tables``, nft or legacy backend), its
idempotent, atomic install, the exact-match check, drift repair and the conntrack flush. Not owned
here: the tools and how they are run (``metaemu.netfilter``), the CLI and the agent's periodic
reconciler (``metaemu.node_setup``), the agent's listener.

The rules, for pod interfaces ``veth+``, agent address ``A:P`` and the IPv6 metadata addresses
``M6`` (``fd20:ce::254`` of Compute Engine, ``fd00:ec2::254`` of AWS IMDS)::

    iptables
    nat    PREROUTING (first) -d 169.254.169.254/32 -i veth+ -j METAEMU-METADATA
           METAEMU-METADATA   -p tcp --dport 80 -j DNAT --to-destination A:P
    filter FORWARD, INPUT (first) -d 169.254.169.254/32 -i veth+ -j METAEMU-METADATA
           METAEMU-METADATA   -p tcp -j REJECT --reject-with tcp-reset; -j REJECT (port unreachable)
           INPUT (first)      -d A/32 -p tcp --dport P -j METAEMU-AGENT
           METAEMU-AGENT      -i lo -j RETURN; -i veth+ -j RETURN; -p tcp -j REJECT --reject-with tcp-reset
    ip6tables
    filter FORWARD, INPUT (first) -d M6/128 -i veth+ -j METAEMU-METADATA    (one per address)
           METAEMU-METADATA   -p tcp -j REJECT --reject-with tcp-reset; -j REJECT (icmp6-port-unreachable)

- Only packets *arriving from pods* are redirected (PREROUTING never sees locally generated
  traffic): hostNetwork processes reach 169.254.169.254 directly, as on GKE. DNAT rewrites only the
  destination and the packet is delivered locally (no SNAT), so the agent sees the pod's own
  address as the TCP peer, which is what node mode identifies pods by.
- SECURITY (lesson 1; SEC-01, SEC-03, SEC-06): every other packet from a pod to 169.254.169.254
  (other ports, UDP, port 80 on a connection tracked before the DNAT existed) is REJECTed, so no
  pod reaches the real metadata server through this node whatever the agent is doing. DNAT'd
  packets no longer carry that destination when the filter table sees them.
- SECURITY (SEC-06): a dual-stack pod could reach the platform's metadata server at its IPv6
  address, so everything pods send to those is REJECTed. Blocked, not redirected: the agent
  listens on IPv4 only; pods use 169.254.169.254 or the names resolving to it. The IPv4-mapped form
  ``[::ffff:169.254.169.254]`` needs no rule of its own: a socket connecting to it sends IPv4
  packets, which the IPv4 rules redirect. ``Netfilter.ipv6`` (``IPv6Mode``) decides whether the
  IPv6 rules are managed: by default whenever the kernel has IPv6, and then a failure of
  ``ip6tables`` fails the install like one of ``iptables`` (fail closed).
- SECURITY (SEC-05, recommendation 1): nothing is removed when the agent stops; the DNAT then
  points at a closed port and pods get "connection refused". ``remove`` is for uninstalling only
  (kube2iam #127: a rule left after uninstall breaks pods).
- SECURITY (SEC-07, CVE-2020-8558): no loopback target (so no ``route_localnet``), and
  ``METAEMU-AGENT`` refuses the agent's port to every interface but pods' and ``lo``.
- Jumps stay *first* in their built-in chains, so a rule inserted above cannot accept the traffic
  before it is redirected or refused; anything else is drift. (An agent that also insists on being
  first, such as Calico in insert mode, will trade places with metaemu; each repair is counted.)

Each install is one ``iptables-restore --noflush`` run per family, each table one transaction:
repairs never open a window without the rules. Everything here blocks on subprocesses bounded by
``metaemu.netfilter.COMMAND_TIMEOUT_S``; the agent calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from metaemu.errors import ConfigError
from metaemu.netfilter import Family, InterceptionError, Netfilter, SavedTable, rule_target

log = logging.getLogger(__name__)

METADATA_ADDRESS = "169.254.169.254"
METADATA_PORT = 80
#: SEC-06 "any platform IPv6 metadata address": Compute Engine's (on VMs with IPv6)
#: and AWS IMDS's on Nitro instances (when its IPv6 endpoint is enabled).
IPV6_METADATA_ADDRESSES = ("fd20:ce::254", "fd00:ec2::254")
#: Chain names (iptables allows 28 characters). The same name in nat and filter is allowed.
METADATA_CHAIN = "METAEMU-METADATA"
AGENT_CHAIN = "METAEMU-AGENT"
_OUR_CHAINS = frozenset({METADATA_CHAIN, AGENT_CHAIN})
#: The tables each family's rules live in (IPv6 has no DNAT, only the block).
_TABLES = {Family.IPV4: ("nat", "filter"), Family.IPV6: ("filter",)}
#: Attempts of one install: a restore fails when another writer changed a chain between our read
#: and our transaction (a ``-D`` of a rule that is gone); each retry re-reads the tables.
INSTALL_ATTEMPTS = 3

_INTERFACE = re.compile(r"[A-Za-z0-9_.@-]{1,15}\+?")
_COMMENT = "metaemu node-setup"


@dataclass(frozen=True, slots=True, kw_only=True)
class InterceptionRule:
    """Where pods' metadata traffic goes, and which interfaces are pods.

    Exactly one of ``pod_interfaces`` (iptables ``-i`` patterns: ``veth+``, ``cali+``, ``eni+``,
    ``cni0``) and ``node_interface`` (every interface but this one is a pod's: ``eth0`` for the
    AWS VPC CNI) must be given. ``target_address:target_port`` is where the agent listens: a
    node-local, non-loopback address (GKE uses 169.254.169.252; the simulated node 169.254.20.1).
    ``ipv6_metadata_addresses`` are blocked for pods (SEC-06).
    """

    target_address: str
    target_port: int
    pod_interfaces: tuple[str, ...] = ()
    node_interface: str | None = None
    metadata_address: str = METADATA_ADDRESS
    metadata_port: int = METADATA_PORT
    ipv6_metadata_addresses: tuple[str, ...] = IPV6_METADATA_ADDRESSES

    def __post_init__(self) -> None:
        target = _ipv4("target_address", self.target_address)
        metadata = _ipv4("metadata_address", self.metadata_address)
        # SECURITY: DNAT to 127/8 needs route_localnet=1, which exposes loopback services to the
        # node's neighbours (CVE-2020-8558, SEC-07).
        if target.is_loopback or target.is_unspecified or target.is_multicast:
            raise ConfigError("target_address", f"{target} cannot receive DNAT'ed pod traffic; use a node-local "
                              "unicast address such as 169.254.169.252 (loopback would need route_localnet)")
        if target == metadata:
            raise ConfigError("target_address", "must differ from the metadata address, whose other ports are "
                              "refused to pods")
        for key, port in (("target_port", self.target_port), ("metadata_port", self.metadata_port)):
            if not 0 < port < 65536:
                raise ConfigError(key, f"{port} is not a TCP port")
        if bool(self.pod_interfaces) == (self.node_interface is not None):
            raise ConfigError("pod_interfaces", "give pod interface patterns or the node interface, exactly one")
        for name in (*self.pod_interfaces, *([self.node_interface] if self.node_interface else [])):
            if not _INTERFACE.fullmatch(name) or len(name) > 15:
                raise ConfigError("pod_interfaces", f"{name!r} is not an interface name or pattern (at most 15 "
                                  "characters, a trailing + matches a prefix)")
        if self.node_interface is not None and self.node_interface.endswith("+"):
            raise ConfigError("node_interface", "must be one interface, not a pattern")
        _ipv6_metadata(self.ipv6_metadata_addresses)

    @property
    def target(self) -> str:
        return f"{self.target_address}:{self.target_port}"


def _ipv4(key: str, value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise ConfigError(key, f"{value!r} is not an IPv4 address") from exc


def _ipv6_metadata(values: tuple[str, ...]) -> None:
    if not values:
        raise ConfigError("ipv6_metadata_addresses", "required: the platforms' IPv6 metadata addresses (SEC-06)")
    for value in values:
        try:
            address = ipaddress.IPv6Address(value)
        except ValueError as exc:
            raise ConfigError("ipv6_metadata_addresses", f"{value!r} is not an IPv6 address") from exc
        if address.ipv4_mapped is not None:  # such a destination is IPv4 on the wire
            raise ConfigError("ipv6_metadata_addresses", f"{value} is IPv4-mapped: the IPv4 rules cover it")


# -- rendering ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _TableRules:
    chains: dict[str, list[tuple[str, ...]]]  # our chain -> its rules, in order
    jumps: dict[str, list[tuple[str, ...]]]   # built-in chain -> our jumps, to be its first rules


def _comment(why: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", f"{_COMMENT}: {why}")


def _desired(rule: InterceptionRule, family: Family) -> dict[str, _TableRules]:
    """The family's rule set by table. Tokens are what ``iptables -A`` takes (and ``-C`` compares)."""
    if rule.node_interface is not None:
        from_pods: list[tuple[str, ...]] = [("!", "-i", rule.node_interface)]
    else:
        from_pods = [("-i", pattern) for pattern in rule.pod_interfaces]
    if family is Family.IPV6:
        return _desired_ipv6(rule, from_pods)
    metadata_jumps = [("-d", f"{rule.metadata_address}/32", *sel, *_comment("pod metadata traffic"),
                       "-j", METADATA_CHAIN) for sel in from_pods]
    agent_jump = ("-d", f"{rule.target_address}/32", "-p", "tcp", "-m", "tcp", "--dport", str(rule.target_port),
                  *_comment("agent port"), "-j", AGENT_CHAIN)
    refuse_off_node = ("-p", "tcp", *_comment("agent port is node-local"), "-j", "REJECT", "--reject-with",
                       "tcp-reset")
    if rule.node_interface is not None:
        guard: list[tuple[str, ...]] = [("-i", rule.node_interface, *refuse_off_node)]
    else:
        guard = [("-i", "lo", "-j", "RETURN"), *[("-i", p, "-j", "RETURN") for p in rule.pod_interfaces],
                 refuse_off_node]
    dnat = ("-p", "tcp", "-m", "tcp", "--dport", str(rule.metadata_port), *_comment("pod metadata to the agent"),
            "-j", "DNAT", "--to-destination", rule.target)
    return {
        "nat": _TableRules(chains={METADATA_CHAIN: [dnat]}, jumps={"PREROUTING": metadata_jumps}),
        "filter": _TableRules(chains={METADATA_CHAIN: _refusals("icmp-port-unreachable"), AGENT_CHAIN: guard},
                              jumps={"FORWARD": metadata_jumps, "INPUT": [*metadata_jumps, agent_jump]}),
    }


def _desired_ipv6(rule: InterceptionRule, from_pods: list[tuple[str, ...]]) -> dict[str, _TableRules]:
    # SEC-06: blocked, never redirected (the agent listens on IPv4 only).
    jumps = [("-d", f"{ipaddress.IPv6Address(address)}/128", *sel, *_comment("pod metadata traffic"),
              "-j", METADATA_CHAIN) for address in rule.ipv6_metadata_addresses for sel in from_pods]
    return {"filter": _TableRules(chains={METADATA_CHAIN: _refusals("icmp6-port-unreachable")},
                                  jumps={"FORWARD": jumps, "INPUT": jumps})}


def _refusals(unreachable: str) -> list[tuple[str, ...]]:
    """TCP gets a reset (the client fails at once), everything else ICMP(v6) port unreachable."""
    refuse = (*_comment("pods reach the metadata address only through the agent"), "-j", "REJECT", "--reject-with")
    return [("-p", "tcp", *refuse, "tcp-reset"), (*refuse, unreachable)]


def _restore_line(*tokens: str) -> str:
    # iptables-restore understands double quotes only; our tokens never contain quotes.
    return " ".join(f'"{t}"' if " " in t else t for t in tokens)


def _label(family: Family, table: str) -> str:
    return table if family is Family.IPV4 else f"IPv6 {table}"


# -- the operations ---------------------------------------------------------------------------


DEFAULT_NETFILTER = Netfilter()


def drift(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> list[str]:
    """How the installed rules differ from ``rule``'s; empty when they are exactly as expected.

    Exactly, in every family ``netfilter.families()`` names: our chains hold exactly the expected
    rules (``iptables -C`` for each, the count, and the order of their targets), and the only rules
    anywhere that jump to our chains are the expected jumps, as the first rules of their built-in
    chains. Raises ``InterceptionError`` when the tools fail.
    """
    return [problem for family in netfilter.families()
            for table, want in _desired(rule, family).items()
            for problem in _table_drift(family, table, want, netfilter=netfilter)]


def _table_drift(family: Family, table: str, want: _TableRules, *, netfilter: Netfilter) -> list[str]:
    problems: list[str] = []
    label = _label(family, table)
    saved = netfilter.save(family, table)
    for chain, specs in want.chains.items():
        if chain not in saved.chains:
            problems.append(f"{label} chain {chain} is missing")
            continue
        have = saved.rules.get(chain, [])
        if [rule_target(r) for r in have] != [rule_target(s) for s in specs]:
            problems.append(f"{label} chain {chain} has {len(have)} rules, expected {len(specs)} in order")
        elif not all(netfilter.check(family, table, chain, s) for s in specs):
            problems.append(f"{label} chain {chain} has a modified rule")
    for chain, rules in saved.rules.items():
        if chain in _OUR_CHAINS:
            continue
        positions = [i for i, r in enumerate(rules) if rule_target(r) in _OUR_CHAINS]
        expected = list(range(len(want.jumps.get(chain, []))))
        if positions != expected:
            problems.append(f"{label} {chain}: jumps to metaemu chains at positions {positions}, expected "
                            f"{expected}")
    for chain, specs in want.jumps.items():
        if chain not in saved.rules:
            problems.append(f"{label} {chain} has no jump to metaemu chains")
        elif not all(netfilter.check(family, table, chain, s) for s in specs):
            problems.append(f"{label} {chain} has a modified jump")
    return problems


def verify(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> bool:
    """True when the installed rules are exactly ``rule``'s (see ``drift``)."""
    return not drift(rule, netfilter=netfilter)


def install(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> None:
    """Install ``rule``'s rule set in every family ``netfilter.families()`` names, replacing any
    earlier metaemu rules (idempotent).

    Per family, one ``iptables-restore --noflush`` run, each table a transaction: our chains are
    rewritten, every existing jump to them is deleted and the expected jumps are inserted first, so
    there is no moment without interception. IPv4 goes first. Raises ``InterceptionError`` if the
    tools of any family keep failing.
    """
    for family in netfilter.families():
        for attempt in range(1, INSTALL_ATTEMPTS + 1):
            saved = {t: netfilter.save(family, t) for t in _TABLES[family]}
            try:
                netfilter.restore(family, _install_payload(_desired(rule, family), saved))
                break
            except InterceptionError:
                if attempt == INSTALL_ATTEMPTS:
                    raise
                log.warning("iptables-restore failed; re-reading the tables and retrying",
                            extra={"attempt": attempt, "family": family.value})


def _install_payload(desired: dict[str, _TableRules], saved: dict[str, SavedTable]) -> str:
    lines: list[str] = []
    for table, want in desired.items():
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in want.chains]  # declares, or flushes (--noflush)
        lines += [_restore_line("-A", chain, *spec) for chain, specs in want.chains.items() for spec in specs]
        lines += _delete_jumps(saved[table])
        lines += [_restore_line("-I", chain, "1", *spec)
                  for chain, specs in want.jumps.items() for spec in reversed(specs)]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _delete_jumps(saved: SavedTable) -> list[str]:
    return [f"-D {chain} {text}" for chain, rules in saved.rules.items() if chain not in _OUR_CHAINS
            for text in rules if rule_target(text) in _OUR_CHAINS]


def remove(*, netfilter: Netfilter = DEFAULT_NETFILTER) -> bool:
    """Delete every metaemu chain and jump in every family ``netfilter.families()`` names
    (uninstall only; the agent never calls this, SEC-05). Returns whether anything was removed.
    """
    removed = False
    for family in netfilter.families():
        lines: list[str] = []
        for table in _TABLES[family]:
            saved = netfilter.save(family, table)
            ours = sorted(_OUR_CHAINS & saved.chains)
            deletes = _delete_jumps(saved)
            if ours or deletes:
                lines += [f"*{table}", *deletes, *[f":{c} - [0:0]" for c in ours], *[f"-X {c}" for c in ours],
                          "COMMIT"]
        if lines:
            netfilter.restore(family, "\n".join(lines) + "\n")
            removed = True
    return removed


_DELETED = re.compile(r"(\d+) flow entries have been deleted")


def flush_conntrack(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> int:
    """Delete conntrack entries of TCP connections to the metadata address and port (SEC-03) and,
    when IPv6 is managed, of every connection to the IPv6 metadata addresses (SEC-06).

    NAT applies to a connection's first packet only, so connections opened before the DNAT existed
    would keep their old destination; after the flush their next packet is treated as new. Returns
    the number of entries deleted; raises ``InterceptionError`` if ``conntrack`` fails.
    """
    commands = [["-p", "tcp", "--orig-dst", rule.metadata_address, "--orig-port-dst", str(rule.metadata_port)]]
    if Family.IPV6 in netfilter.families():
        commands += [["-f", Family.IPV6.value, "--orig-dst", address] for address in rule.ipv6_metadata_addresses]
    return sum(_conntrack_delete(netfilter, args) for args in commands)


def _conntrack_delete(netfilter: Netfilter, args: Sequence[str]) -> int:
    result = netfilter.runner.run([netfilter.conntrack, "-D", *args])
    match = _DELETED.search(result.stderr)
    # conntrack exits 1 when nothing matched ("0 flow entries have been deleted").
    if match is None or (result.returncode != 0 and match.group(1) != "0"):
        raise InterceptionError(f"{netfilter.conntrack} -D failed", result=result)
    return int(match.group(1))


def reconcile(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> bool:
    """Restore ``rule``'s rules, in every family, if they drifted; returns whether anything was
    changed.

    After a repair, conntrack entries for the metadata addresses are flushed (best effort: a failed
    flush is logged; the filter rules refuse such connections anyway). Raises ``InterceptionError``
    if the tools fail or the rules are still not as expected after the install.
    """
    problems = drift(rule, netfilter=netfilter)
    if not problems:
        return False
    log.warning("interception rules drifted; restoring them", extra={"problems": "; ".join(problems)})
    install(rule, netfilter=netfilter)
    remaining = drift(rule, netfilter=netfilter)
    if remaining:
        raise InterceptionError("interception rules are still not as expected after install: "
                                + "; ".join(remaining))
    try:
        flush_conntrack(rule, netfilter=netfilter)
    except InterceptionError as exc:
        log.warning("could not flush conntrack after restoring the rules", extra={"error": str(exc)})
    return True
