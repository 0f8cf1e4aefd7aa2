"""Node-mode interception: the netfilter rules that make pods' metadata traffic reach the agent.

Owns the rule set (for the node's ``iptables``, nft or legacy backend), its idempotent, atomic
install, the exact-match check, drift repair and the conntrack flush. Not owned here: the CLI and
the agent's periodic reconciler (``metaemu.node_setup``), the agent's listener.

The rules, for pod interfaces ``veth+`` and agent address ``A:P``::

    nat    PREROUTING (first) -d 169.254.169.254/32 -i veth+ -j METAEMU-METADATA
           METAEMU-METADATA   -p tcp --dport 80 -j DNAT --to-destination A:P
    filter FORWARD, INPUT (first) -d 169.254.169.254/32 -i veth+ -j METAEMU-METADATA
           METAEMU-METADATA   -p tcp -j REJECT --reject-with tcp-reset; -j REJECT (port unreachable)
           INPUT (first)      -d A/32 -p tcp --dport P -j METAEMU-AGENT
           METAEMU-AGENT      -i lo -j RETURN; -i veth+ -j RETURN; -p tcp -j REJECT --reject-with tcp-reset

- Only packets *arriving from pods* are redirected (PREROUTING never sees locally generated
  traffic): hostNetwork processes reach 169.254.169.254 directly, as on GKE. DNAT rewrites only the
  destination and the packet is delivered locally (no SNAT), so the agent sees the pod's own
  address as the TCP peer, which is what node mode identifies pods by.
- SECURITY (lesson 1; SEC-01, SEC-03, SEC-06): every other packet from a pod to 169.254.169.254
  (other ports, UDP, port 80 on a connection tracked before the DNAT existed) is REJECTed, so no
  pod reaches the real metadata server through this node whatever the agent is doing. DNAT'd
  packets no longer carry that destination when the filter table sees them.
- SECURITY (SEC-05, recommendation 1): nothing is removed when the agent stops; the DNAT then
  points at a closed port and pods get "connection refused". ``remove`` is for uninstalling only
  (kube2iam #127: a rule left after uninstall breaks pods).
- SECURITY (SEC-07, CVE-2020-8558): no loopback target (so no ``route_localnet``), and
  ``METAEMU-AGENT`` refuses the agent's port to every interface but pods' and ``lo``.
- Jumps stay *first* in their built-in chains, so a rule inserted above cannot accept the traffic
  before it is redirected or refused; anything else is drift. (An agent that also insists on being
  first, such as Calico in insert mode, will trade places with metaemu; each repair is counted.)

Each install is one ``iptables-restore --noflush`` transaction per table: repairs never open a
window without the rules. Everything here blocks on subprocesses bounded by ``COMMAND_TIMEOUT_S``;
the agent calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from metaemu.errors import ConfigError, MetaemuError

log = logging.getLogger(__name__)

METADATA_ADDRESS = "169.254.169.254"
METADATA_PORT = 80
#: Chain names (iptables allows 28 characters). The same name in nat and filter is allowed.
METADATA_CHAIN = "METAEMU-METADATA"
AGENT_CHAIN = "METAEMU-AGENT"
_OUR_CHAINS = frozenset({METADATA_CHAIN, AGENT_CHAIN})
#: Seconds to wait for the xtables lock (legacy backend; kube-proxy and CNI plugins hold it for
#: seconds while rewriting large tables). The nft backend ignores it.
IPTABLES_LOCK_WAIT_S = 5
#: Attempts of one install: a restore fails when another writer changed a chain between our read
#: and our transaction (a ``-D`` of a rule that is gone); each retry re-reads the tables.
INSTALL_ATTEMPTS = 3
#: Bound on one iptables/conntrack/ip command: the lock wait plus the work (milliseconds on a
#: normal node; seconds when rewriting tables of tens of thousands of rules).
COMMAND_TIMEOUT_S = 30.0

_INTERFACE = re.compile(r"[A-Za-z0-9_.@-]{1,15}\+?")
_COMMENT = "metaemu node-setup"


class InterceptionError(MetaemuError):
    """A netfilter or iproute2 command failed. ``result`` is what it returned (``None`` when it
    could not run). To move into ``metaemu.errors`` (MetaemuError -> InterceptionError)."""

    def __init__(self, message: str, *, result: CommandResult | None = None) -> None:
        detail = "" if result is None else f" (exit {result.returncode}: {result.stderr.strip()[-500:]})"
        super().__init__(message + detail)
        self.result = result


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        """Run ``argv`` to completion; raises ``InterceptionError`` only if it cannot run or times out."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubprocessRunner:
    """Runs commands as subprocesses, after ``prefix`` (e.g. ``nsenter --net=PATH`` to act on
    another network namespace), each bounded by ``timeout_s``. Blocking."""

    prefix: tuple[str, ...] = ()
    timeout_s: float = COMMAND_TIMEOUT_S

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        full = (*self.prefix, *argv)
        try:
            done = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=self.timeout_s,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InterceptionError(f"cannot run {argv[0]}: {exc}") from exc
        return CommandResult(argv=full, returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)


@dataclass(frozen=True, slots=True, kw_only=True)
class InterceptionRule:
    """Where pods' metadata traffic goes, and which interfaces are pods.

    Exactly one of ``pod_interfaces`` (iptables ``-i`` patterns: ``veth+``, ``cali+``, ``eni+``,
    ``cni0``) and ``node_interface`` (every interface but this one is a pod's: ``eth0`` for the
    AWS VPC CNI) must be given. ``target_address:target_port`` is where the agent listens: a
    node-local, non-loopback address (GKE uses 169.254.169.252; the simulated node 169.254.20.1).
    """

    target_address: str
    target_port: int
    pod_interfaces: tuple[str, ...] = ()
    node_interface: str | None = None
    metadata_address: str = METADATA_ADDRESS
    metadata_port: int = METADATA_PORT

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

    @property
    def target(self) -> str:
        return f"{self.target_address}:{self.target_port}"


def _ipv4(key: str, value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise ConfigError(key, f"{value!r} is not an IPv4 address") from exc


# -- rendering ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _TableRules:
    chains: dict[str, list[tuple[str, ...]]]  # our chain -> its rules, in order
    jumps: dict[str, list[tuple[str, ...]]]   # built-in chain -> our jumps, to be its first rules


def _comment(why: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", f"{_COMMENT}: {why}")


def _desired(rule: InterceptionRule) -> dict[str, _TableRules]:
    """The rule set by table. Tokens are what ``iptables -A`` takes (and ``-C`` compares)."""
    if rule.node_interface is not None:
        from_pods: list[tuple[str, ...]] = [("!", "-i", rule.node_interface)]
    else:
        from_pods = [("-i", pattern) for pattern in rule.pod_interfaces]
    metadata_jumps = [("-d", f"{rule.metadata_address}/32", *sel, *_comment("pod metadata traffic"),
                       "-j", METADATA_CHAIN) for sel in from_pods]
    agent_jump = ("-d", f"{rule.target_address}/32", "-p", "tcp", "-m", "tcp", "--dport", str(rule.target_port),
                  *_comment("agent port"), "-j", AGENT_CHAIN)
    refuse = (*_comment("pods reach the metadata address only through the agent"), "-j", "REJECT", "--reject-with")
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
        "filter": _TableRules(
            chains={METADATA_CHAIN: [("-p", "tcp", *refuse, "tcp-reset"), (*refuse, "icmp-port-unreachable")],
                    AGENT_CHAIN: guard},
            jumps={"FORWARD": metadata_jumps, "INPUT": [*metadata_jumps, agent_jump]}),
    }


def _restore_line(*tokens: str) -> str:
    # iptables-restore understands double quotes only; our tokens never contain quotes.
    return " ".join(f'"{t}"' if " " in t else t for t in tokens)


# -- reading the current state --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _SavedTable:
    chains: frozenset[str]
    rules: dict[str, list[str]]  # chain -> rule texts after "-A <chain> ", in order


def _parse_save(text: str) -> _SavedTable:
    chains: set[str] = set()
    rules: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(":"):
            chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            chain, _, rest = line[3:].partition(" ")
            rules.setdefault(chain, []).append(rest)
    return _SavedTable(chains=frozenset(chains), rules=rules)


def _target(rule: str | Sequence[str]) -> str | None:
    """The ``-j``/``-g`` target of a saved rule's text or of a token list."""
    if isinstance(rule, str):
        try:
            tokens: Sequence[str] = shlex.split(rule)
        except ValueError:  # a foreign rule with quoting shlex rejects: whitespace is close enough
            tokens = rule.split()
    else:
        tokens = rule
    for i, token in enumerate(tokens[:-1]):
        if token in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


# -- the commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Netfilter:
    """The node's netfilter tools: ``iptables`` (its ``-save``/``-restore`` siblings are derived
    from its name: ``iptables-legacy`` -> ``iptables-legacy-save``) and ``conntrack``, run through
    ``runner``. Use the ``iptables`` of the backend the node's kube-proxy and CNI use."""

    iptables: str = "iptables"
    conntrack: str = "conntrack"
    runner: CommandRunner = field(default_factory=SubprocessRunner)

    def save(self, table: str) -> _SavedTable:
        result = self.runner.run([f"{self.iptables}-save", "-t", table])
        if result.returncode != 0:
            raise InterceptionError(f"{self.iptables}-save -t {table} failed", result=result)
        return _parse_save(result.stdout)

    def restore(self, payload: str) -> None:
        result = self.runner.run([f"{self.iptables}-restore", "--noflush", "--wait", str(IPTABLES_LOCK_WAIT_S)],
                                 stdin=payload)
        if result.returncode != 0:
            raise InterceptionError(f"{self.iptables}-restore failed", result=result)

    def check(self, table: str, chain: str, spec: Sequence[str]) -> bool:
        """``iptables -C``: whether a rule equal to ``spec`` (as the kernel compares it) exists."""
        result = self.runner.run([self.iptables, "-w", str(IPTABLES_LOCK_WAIT_S), "-t", table, "-C", chain, *spec])
        if result.returncode in (0, 1):
            return result.returncode == 0
        raise InterceptionError(f"{self.iptables} -C {chain} failed", result=result)


DEFAULT_NETFILTER = Netfilter()


def drift(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> list[str]:
    """How the installed rules differ from ``rule``'s; empty when they are exactly as expected.

    Exactly: our chains hold exactly the expected rules (``iptables -C`` for each, the count, and
    the order of their targets), and the only rules anywhere that jump to our chains are the
    expected jumps, as the first rules of their built-in chains. Raises ``InterceptionError``
    when the tools fail.
    """
    problems: list[str] = []
    for table, want in _desired(rule).items():
        saved = netfilter.save(table)
        for chain, specs in want.chains.items():
            if chain not in saved.chains:
                problems.append(f"{table} chain {chain} is missing")
                continue
            have = saved.rules.get(chain, [])
            if [_target(r) for r in have] != [_target(s) for s in specs]:
                problems.append(f"{table} chain {chain} has {len(have)} rules, expected {len(specs)} in order")
            elif not all(netfilter.check(table, chain, s) for s in specs):
                problems.append(f"{table} chain {chain} has a modified rule")
        for chain, rules in saved.rules.items():
            if chain in _OUR_CHAINS:
                continue
            positions = [i for i, r in enumerate(rules) if _target(r) in _OUR_CHAINS]
            expected = list(range(len(want.jumps.get(chain, []))))
            if positions != expected:
                problems.append(f"{table} {chain}: jumps to metaemu chains at positions {positions}, expected "
                                f"{expected}")
        for chain, specs in want.jumps.items():
            if chain not in saved.rules:
                problems.append(f"{table} {chain} has no jump to metaemu chains")
            elif not all(netfilter.check(table, chain, s) for s in specs):
                problems.append(f"{table} {chain} has a modified jump")
    return problems


def verify(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> bool:
    """True when the installed rules are exactly ``rule``'s (see ``drift``)."""
    return not drift(rule, netfilter=netfilter)


def install(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> None:
    """Install ``rule``'s rule set, replacing any earlier metaemu rules (idempotent).

    One ``iptables-restore --noflush`` transaction per table: our chains are rewritten, every
    existing jump to them is deleted and the expected jumps are inserted first, so there is no
    moment without interception. Raises ``InterceptionError`` if the tools keep failing.
    """
    for attempt in range(1, INSTALL_ATTEMPTS + 1):
        payload = _install_payload(_desired(rule), {t: netfilter.save(t) for t in ("nat", "filter")})
        try:
            netfilter.restore(payload)
            return
        except InterceptionError:
            if attempt == INSTALL_ATTEMPTS:
                raise
            log.warning("iptables-restore failed; re-reading the tables and retrying", extra={"attempt": attempt})


def _install_payload(desired: dict[str, _TableRules], saved: dict[str, _SavedTable]) -> str:
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


def _delete_jumps(saved: _SavedTable) -> list[str]:
    return [f"-D {chain} {text}" for chain, rules in saved.rules.items() if chain not in _OUR_CHAINS
            for text in rules if _target(text) in _OUR_CHAINS]


def remove(*, netfilter: Netfilter = DEFAULT_NETFILTER) -> bool:
    """Delete every metaemu chain and jump (uninstall only; the agent never calls this, SEC-05).

    Returns whether anything was removed.
    """
    lines: list[str] = []
    for table in ("nat", "filter"):
        saved = netfilter.save(table)
        ours = sorted(_OUR_CHAINS & saved.chains)
        deletes = _delete_jumps(saved)
        if ours or deletes:
            lines += [f"*{table}", *deletes, *[f":{c} - [0:0]" for c in ours], *[f"-X {c}" for c in ours], "COMMIT"]
    if lines:
        netfilter.restore("\n".join(lines) + "\n")
    return bool(lines)


_DELETED = re.compile(r"(\d+) flow entries have been deleted")


def flush_conntrack(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> int:
    """Delete conntrack entries of TCP connections to the metadata address and port (SEC-03).

    NAT applies to a connection's first packet only, so connections opened before the DNAT existed
    would keep their old destination; after the flush their next packet is treated as new. Returns
    the number of entries deleted; raises ``InterceptionError`` if ``conntrack`` fails.
    """
    result = netfilter.runner.run([netfilter.conntrack, "-D", "-p", "tcp", "--orig-dst", rule.metadata_address,
                                   "--orig-port-dst", str(rule.metadata_port)])
    match = _DELETED.search(result.stderr)
    # conntrack exits 1 when nothing matched ("0 flow entries have been deleted").
    if match is None or (result.returncode != 0 and match.group(1) != "0"):
        raise InterceptionError(f"{netfilter.conntrack} -D failed", result=result)
    return int(match.group(1))


def reconcile(rule: InterceptionRule, *, netfilter: Netfilter = DEFAULT_NETFILTER) -> bool:
    """Restore ``rule``'s rules if they drifted; returns whether anything was changed.

    After a repair, conntrack entries for the metadata address are flushed (best effort: a failed
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
