"""The node's netfilter tools, per address family: running ``iptables``/``ip6tables`` and
``conntrack`` through a ``CommandRunner`` and reading what they print.

Owns the command seam (``CommandRunner``, ``SubprocessRunner``), the derivation of each family's
commands from one ``iptables`` name, whether the node needs IPv6 rules (``IPv6Mode``,
``Netfilter.families``) and the parsing of ``iptables-save`` output. Not owned here: which rules
metaemu wants and how they are installed and checked (``metaemu.interception``).
"""

from __future__ import annotations

import enum
import logging
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from metaemu.errors import ConfigError, MetaemuError

log = logging.getLogger(__name__)

#: Seconds to wait for the xtables lock (legacy backend; kube-proxy and CNI plugins hold it for
#: seconds while rewriting large tables). The nft backend ignores it.
IPTABLES_LOCK_WAIT_S = 5
#: Bound on one iptables/conntrack/ip command: the lock wait plus the work (milliseconds on a
#: normal node; seconds when rewriting tables of tens of thousands of rules).
COMMAND_TIMEOUT_S = 30.0
#: Exists exactly when the kernel has IPv6 (absent with ``ipv6.disable=1`` or without the ipv6
#: module; in every network namespace alike, so pods then cannot send IPv6 either).
KERNEL_IPV6_FILE = "/proc/net/if_inet6"


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


class Family(enum.StrEnum):
    """An address family; the values are ``conntrack -f``'s names for them."""

    IPV4 = "ipv4"
    IPV6 = "ipv6"


class IPv6Mode(enum.StrEnum):
    """Whether metaemu manages IPv6 (``ip6tables``) rules too (SEC-06)."""

    AUTO = "auto"  # when the kernel has IPv6 (``KERNEL_IPV6_FILE``); skipped, and logged, when not
    REQUIRE = "require"  # always: a node whose ip6tables fails is not set up
    OFF = "off"  # never: pods with IPv6 may reach an IPv6 metadata address


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedTable:
    """One table of ``iptables-save`` output."""

    chains: frozenset[str]
    rules: dict[str, list[str]]  # chain -> rule texts after "-A <chain> ", in order


def parse_save(text: str) -> SavedTable:
    chains: set[str] = set()
    rules: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(":"):
            chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            chain, _, rest = line[3:].partition(" ")
            rules.setdefault(chain, []).append(rest)
    return SavedTable(chains=frozenset(chains), rules=rules)


def rule_target(rule: str | Sequence[str]) -> str | None:
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Netfilter:
    """The node's netfilter tools: ``iptables`` names the IPv4 command of the backend the node's
    kube-proxy and CNI use; every other command is derived from it (``iptables-legacy`` ->
    ``iptables-legacy-save``, ``ip6tables-legacy``, ``ip6tables-legacy-restore``). ``conntrack``
    serves both families. ``ipv6`` says whether IPv6 rules are managed. All run through ``runner``;
    raises ``ConfigError`` when ``iptables`` is not named ``iptables*``.
    """

    iptables: str = "iptables"
    conntrack: str = "conntrack"
    ipv6: IPv6Mode = IPv6Mode.AUTO
    runner: CommandRunner = field(default_factory=SubprocessRunner)

    def __post_init__(self) -> None:
        if not self.iptables.rpartition("/")[2].startswith("iptables"):
            raise ConfigError("iptables", f"{self.iptables!r} is not an iptables command (iptables, iptables-nft, "
                              "iptables-legacy, or a path to one): the -save, -restore and ip6tables commands "
                              "are derived from its name")

    def command(self, family: Family) -> str:
        """``iptables`` or its IPv6 twin: ``/usr/sbin/iptables-nft`` -> ``/usr/sbin/ip6tables-nft``."""
        if family is Family.IPV4:
            return self.iptables
        directory, slash, name = self.iptables.rpartition("/")
        return f"{directory}{slash}ip6{name.removeprefix('ip')}"

    def families(self) -> tuple[Family, ...]:
        """The families whose rules this node needs: IPv4, and IPv6 unless ``ipv6`` is off or is
        auto on a kernel without IPv6. Raises ``InterceptionError`` when that cannot be told."""
        if self.ipv6 is IPv6Mode.OFF:
            return (Family.IPV4,)
        if self.ipv6 is IPv6Mode.AUTO and not self.kernel_has_ipv6():
            log.debug("the kernel has no IPv6; managing IPv4 rules only")
            return (Family.IPV4,)
        return (Family.IPV4, Family.IPV6)

    def kernel_has_ipv6(self) -> bool:
        """Whether ``KERNEL_IPV6_FILE`` exists where ``runner`` runs (the node's, or a test
        namespace's, kernel). Raises ``InterceptionError`` when the check itself fails."""
        result = self.runner.run(["test", "-e", KERNEL_IPV6_FILE])
        if result.returncode in (0, 1):
            return result.returncode == 0
        raise InterceptionError(f"cannot tell whether the kernel has IPv6 ({KERNEL_IPV6_FILE})", result=result)

    def save(self, family: Family, table: str) -> SavedTable:
        command = f"{self.command(family)}-save"
        result = self.runner.run([command, "-t", table])
        if result.returncode != 0:
            raise InterceptionError(f"{command} -t {table} failed", result=result)
        return parse_save(result.stdout)

    def restore(self, family: Family, payload: str) -> None:
        command = f"{self.command(family)}-restore"
        result = self.runner.run([command, "--noflush", "--wait", str(IPTABLES_LOCK_WAIT_S)], stdin=payload)
        if result.returncode != 0:
            raise InterceptionError(f"{command} failed", result=result)

    def check(self, family: Family, table: str, chain: str, spec: Sequence[str]) -> bool:
        """``iptables -C``: whether a rule equal to ``spec`` (as the kernel compares it) exists."""
        command = self.command(family)
        result = self.runner.run([command, "-w", str(IPTABLES_LOCK_WAIT_S), "-t", table, "-C", chain, *spec])
        if result.returncode in (0, 1):
            return result.returncode == 0
        raise InterceptionError(f"{command} -C {chain} failed", result=result)
