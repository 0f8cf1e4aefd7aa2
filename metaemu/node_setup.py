"""``metaemu node-setup`` and the agent's reconciler of what it installs (node mode, issue #4).

``node-setup`` runs in an init container of the node-mode DaemonSet (hostNetwork, ``NET_ADMIN``):
optionally puts the agent's address on a node-local device, installs the interception rules
(``metaemu.interception``; IPv4 and, whenever the kernel has IPv6, IPv6: SEC-06), verifies them, and
flushes conntrack entries for the metadata addresses (SEC-03). It exits non-zero when any step fails,
so the pod does not start and the init container is retried. ``interception_reconciler`` is the
agent's background task that keeps the rules in place (SEC-04). Nothing here removes the rules on
shutdown (SEC-05); ``--uninstall`` is for removing metaemu from a node.

Not owned here: the rules themselves (``metaemu.interception``), the agent's listener.

``metadata.google.internal``: the rules redirect an *address*; pods must also resolve the names
Google clients use to it. Off Google Cloud nothing resolves them, so configure one of:

- cluster-wide, a CoreDNS ``hosts`` block in the Corefile's ``.:53`` server (``kubectl -n
  kube-system edit configmap coredns``)::

      hosts {
          169.254.169.254 metadata.google.internal metadata
          fallthrough
      }

- per pod, ``hostAliases`` (they are written into the pod's ``/etc/hosts``)::

      spec:
        hostAliases:
        - ip: 169.254.169.254
          hostnames: [metadata.google.internal, metadata]

Always map the names to 169.254.169.254, never to the agent's own address: the DNAT then applies,
the agent sees the pod's address, and the ``Host`` header is one it accepts. Clients that use the
address directly (google-auth's GCE detection, ``GCE_METADATA_IP``) need nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from metaemu.clock import Clock
from metaemu.errors import ConfigError
from metaemu.interception import (
    DEFAULT_NETFILTER,
    InterceptionRule,
    drift,
    flush_conntrack,
    install,
    reconcile,
    remove,
)
from metaemu.logs import setup_logging
from metaemu.netfilter import (
    KERNEL_IPV6_FILE,
    CommandRunner,
    Family,
    InterceptionError,
    IPv6Mode,
    Netfilter,
    SubprocessRunner,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1  # a command failed or the rules are not as expected (--check: drift)
EXIT_CONFIG = 2  # same code as ``metaemu serve`` for configuration errors
#: SEC-04 requires repair within 60 s; aad NMI reconciles every 60 s. Half that leaves margin.
RECONCILE_INTERVAL_S = 30.0
#: First retry after a failed reconcile; doubles up to the interval (STYLE: log, count, back off).
RECONCILE_RETRY_INITIAL_S = 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metaemu node-setup",
        description="Redirect pods' traffic to 169.254.169.254:80 to the node-mode agent and refuse everything "
        "else pods send to that address or to the platforms' IPv6 metadata addresses. Idempotent; never removes "
        "the rules unless --uninstall.")
    p.add_argument("--to", metavar="ADDRESS:PORT", help="the agent's node-local listen address "
                   "(env METAEMU_INTERCEPT_TO), e.g. 169.254.169.252:988")
    p.add_argument("--pod-interface", action="append", metavar="PATTERN", help="interface pods' traffic arrives "
                   "on, repeatable: veth+, cali+, eni+, cni0 (env METAEMU_POD_INTERFACES, comma-separated)")
    p.add_argument("--node-interface", metavar="NAME", help="instead: every interface but this one carries pods' "
                   "traffic, e.g. eth0 (env METAEMU_NODE_INTERFACE)")
    p.add_argument("--local-address-dev", metavar="DEVICE", help="first put ADDRESS/32 on this device, creating "
                   "it as a dummy link if missing, e.g. metaemu0 (env METAEMU_LOCAL_ADDRESS_DEV)")
    p.add_argument("--iptables", help="iptables command of the node's backend, e.g. iptables-legacy; the "
                   "ip6tables command is derived from it (env METAEMU_IPTABLES; default iptables)")
    p.add_argument("--ipv6", choices=[m.value for m in IPv6Mode], help="also block pods' traffic to the IPv6 "
                   "metadata addresses fd20:ce::254 and fd00:ec2::254 with ip6tables (SEC-06): auto when the "
                   f"kernel has IPv6 ({KERNEL_IPV6_FILE} exists), require always, off never "
                   "(env METAEMU_IPV6; default auto)")
    p.add_argument("--conntrack", default="conntrack", help="conntrack command (default %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only verify: exit 0 when the rules are exactly in "
                      "place, 1 otherwise")
    mode.add_argument("--uninstall", action="store_true", help="remove every metaemu rule (pods then reach "
                      "whatever answers at 169.254.169.254)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def rule_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> InterceptionRule:
    """The ``InterceptionRule`` from flags, falling back to ``METAEMU_*`` variables; raises
    ``ConfigError``."""
    target = args.to or environ.get("METAEMU_INTERCEPT_TO", "")
    address, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError("--to", f"{target!r} is not ADDRESS:PORT")
    if args.pod_interface or args.node_interface:  # flags replace the environment's selector entirely
        pods, node = args.pod_interface or [], args.node_interface
    else:
        pods = [p for p in environ.get("METAEMU_POD_INTERFACES", "").replace(" ", ",").split(",") if p]
        node = environ.get("METAEMU_NODE_INTERFACE") or None
    return InterceptionRule(target_address=address, target_port=int(port), pod_interfaces=tuple(pods),
                            node_interface=node)


def ensure_local_address(address: str, *, device: str, runner: CommandRunner) -> None:
    """Put ``address``/32 on ``device`` (idempotent), creating it as a dummy link if it does not
    exist, and bring it up; raises ``InterceptionError``. This is the EKS Pod Identity Agent's
    ``pod-id-link0`` pattern: an address only this node answers for, not the node IP (SEC-07)."""
    if runner.run(["ip", "link", "show", "dev", device]).returncode != 0:
        _ip(runner, "link", "add", device, "type", "dummy")
    _ip(runner, "addr", "replace", f"{address}/32", "dev", device)
    _ip(runner, "link", "set", device, "up")


def _ip(runner: CommandRunner, *args: str) -> None:
    result = runner.run(["ip", *args])
    if result.returncode != 0:
        raise InterceptionError(f"ip {' '.join(args)} failed", result=result)


def netfilter_from_args(args: argparse.Namespace, environ: Mapping[str, str], *,
                        runner: CommandRunner) -> Netfilter:
    """The node's tools from flags, falling back to ``METAEMU_*`` variables; raises ``ConfigError``."""
    ipv6 = args.ipv6 or environ.get("METAEMU_IPV6") or IPv6Mode.AUTO
    if ipv6 not in {m.value for m in IPv6Mode}:
        raise ConfigError("--ipv6", f"{ipv6!r} (METAEMU_IPV6) is not one of auto, require, off")
    return Netfilter(iptables=args.iptables or environ.get("METAEMU_IPTABLES") or "iptables",
                     conntrack=args.conntrack, ipv6=IPv6Mode(ipv6), runner=runner)


def main(argv: Sequence[str], *, environ: Mapping[str, str], runner: CommandRunner | None = None) -> int:
    """Run ``metaemu node-setup`` with ``runner`` (default: subprocesses); returns the exit code
    (``EXIT_*``)."""
    args = build_parser().parse_args(list(argv))
    try:
        netfilter = netfilter_from_args(args, environ, runner=runner or SubprocessRunner())
        rule = None if args.uninstall else rule_from_args(args, environ)
    except ConfigError as exc:
        print(f"metaemu node-setup: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(args.log_level)
    try:
        if rule is None:
            log.warning("removing metaemu's interception rules", extra={"removed": remove(netfilter=netfilter)})
            return EXIT_OK
        if args.check:
            problems = drift(rule, netfilter=netfilter)
            for problem in problems:
                print(f"metaemu node-setup: {problem}", file=sys.stderr)
            return EXIT_FAILED if problems else EXIT_OK
        device = args.local_address_dev or environ.get("METAEMU_LOCAL_ADDRESS_DEV")
        return _setup(rule, netfilter=netfilter, device=device)
    except InterceptionError as exc:
        log.error("node setup failed", extra={"error": str(exc)})
        return EXIT_FAILED


def _setup(rule: InterceptionRule, *, netfilter: Netfilter, device: str | None) -> int:
    if device:
        ensure_local_address(rule.target_address, device=device, runner=netfilter.runner)
    families = netfilter.families()
    if Family.IPV6 not in families:
        _log_ipv6_skipped(netfilter.ipv6)
    install(rule, netfilter=netfilter)
    problems = drift(rule, netfilter=netfilter)
    if problems:
        log.error("interception rules are not as expected after install", extra={"problems": "; ".join(problems)})
        return EXIT_FAILED
    # SEC-03: only after the rules exist, so no new untranslated connection can be tracked after it.
    flushed = flush_conntrack(rule, netfilter=netfilter)
    log.info("interception installed and verified", extra={
        "target": rule.target, "pod_interfaces": ",".join(rule.pod_interfaces),
        "node_interface": rule.node_interface or "", "families": ",".join(families), "conntrack_flushed": flushed})
    return EXIT_OK


def _log_ipv6_skipped(mode: IPv6Mode) -> None:
    if mode is IPv6Mode.OFF:
        # SECURITY (SEC-06): a dual-stack pod may reach the platform's metadata server over IPv6.
        log.warning("IPv6 interception is off (--ipv6 off): pods' IPv6 traffic to the metadata addresses is not "
                    "blocked")
    else:
        log.info("the kernel has no IPv6, so no pod can use it: installing IPv4 rules only",
                 extra={"missing": KERNEL_IPV6_FILE})


# -- the agent's reconciler -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InterceptionMetrics:
    """``metaemu_interception_*`` (to move into ``metaemu.metrics``)."""

    reconciled: Counter  # metaemu_interception_reconciled_total: drifted rules restored (SEC-04)
    errors: Counter  # metaemu_interception_reconcile_errors_total: checks or repairs that failed
    rule_present: Gauge  # metaemu_interception_rule_present (SEC-40): 1 when last found exact or restored


def create_interception_metrics(registry: CollectorRegistry) -> InterceptionMetrics:
    return InterceptionMetrics(
        reconciled=Counter("metaemu_interception_reconciled", "Times the interception rules had drifted and "
                           "were restored.", registry=registry),
        errors=Counter("metaemu_interception_reconcile_errors", "Interception rule checks or repairs that failed.",
                       registry=registry),
        rule_present=Gauge("metaemu_interception_rule_present", "1 when the interception rules were last found "
                           "exactly as expected (or restored), else 0.", registry=registry),
    )


async def interception_reconciler(rule: InterceptionRule, *, clock: Clock, stop_event: asyncio.Event,
                                  metrics: InterceptionMetrics, netfilter: Netfilter = DEFAULT_NETFILTER,
                                  interval_s: float = RECONCILE_INTERVAL_S) -> None:
    """Check the rules of every family ``netfilter.families()`` names now and every ``interval_s``,
    restoring drift (SEC-04), until ``stop_event``.

    Never removes the rules (SEC-05) and never dies on a failure: it logs, counts and retries with
    backoff from ``RECONCILE_RETRY_INITIAL_S`` up to ``interval_s``. The blocking work runs in a
    worker thread; cancellation propagates (the thread's commands are bounded by their timeout).
    """
    failures = 0
    while not stop_event.is_set():
        try:
            changed = await asyncio.to_thread(reconcile, rule, netfilter=netfilter)
        except Exception:
            failures += 1
            metrics.errors.inc()
            metrics.rule_present.set(0)
            delay = min(interval_s, RECONCILE_RETRY_INITIAL_S * 2 ** (failures - 1))
            log.exception("interception reconcile failed", extra={"failures": failures, "retry_in_s": delay})
        else:
            failures = 0
            metrics.rule_present.set(1)
            if changed:
                metrics.reconciled.inc()
            delay = interval_s
        if await clock.sleep(delay, until=stop_event):
            return


if __name__ == "__main__":  # ``python -m metaemu.node_setup`` until the CLI subcommand is wired
    sys.exit(main(sys.argv[1:], environ=dict(os.environ)))
