"""``metaemu doctor``: flags, the order of the steps, output and exit status (issue #14).

Exit status: 0 when the chain works (warnings allowed), 1 when a step failed (the configuration
included), 2 for bad flags. Human output by default, ``--json`` for machines.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from metaemu.clock import Clock, SystemClock
from metaemu.config import Config, load_config
from metaemu.doctor.chain import STEPS, run_chain, sidecar_chain
from metaemu.doctor.diagnosis import ChainFacts
from metaemu.doctor.node import check_interception, check_pod, interception_rule, pod_chain
from metaemu.doctor.reachability import DEFAULT_ADDRESS, DEFAULT_NAMES, Resolver, check_names, check_server
from metaemu.doctor.report import Check, Report, render_human, render_json
from metaemu.errors import ConfigError
from metaemu.metrics import create_metrics
from metaemu.netfilter import CommandRunner, IPv6Mode, Netfilter, SubprocessRunner
from metaemu.pods.kube_client import KubeClient, KubeConnection
from metaemu.pods.stream import KubeHttp
from metaemu.transport import HttpClient

EXIT_OK, EXIT_BROKEN = 0, 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaemu doctor", description="Run the credential chain step by step and "
                                "stop at the first broken link with the exact fix. Exit 0 only when it works.")
    p.add_argument("--config", type=Path, help="the YAML configuration metaemu serves with (default: $METAEMU_CONFIG)")
    p.add_argument("--credential-config", type=Path, help="a Google external_account credential file instead")
    p.add_argument("--pod", metavar="NAMESPACE/NAME", help="node mode: check this pod's chain as the agent serves it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--metadata-address", metavar="HOST[:PORT]", help="the metadata address apps use (default "
                   f"{DEFAULT_ADDRESS}; node mode checks it only when given)")
    p.add_argument("--metadata-name", action="append", metavar="NAME", help="a name that must resolve to it, "
                   f"repeatable (default {', '.join(DEFAULT_NAMES)})")
    p.add_argument("--pod-interface", action="append", default=[], metavar="PATTERN", help="node mode: the pod "
                   "interfaces node-setup was given (default node.intercept_pod_interfaces)")
    p.add_argument("--node-interface", metavar="NAME", help="node mode: instead, the node's own interface")
    p.add_argument("--iptables", default="iptables",
                   help="iptables command of the node's backend (default %(default)s)")
    p.add_argument("--ipv6", choices=[m.value for m in IPv6Mode], default=IPv6Mode.AUTO.value,
                   help="check the IPv6 block as node-setup --ipv6 installs it (default %(default)s)")
    return p


async def doctor(argv: Sequence[str], *, environ: Mapping[str, str], clock: Clock, http: HttpClient,
                 resolver: Resolver, out: TextIO, runner: CommandRunner | None = None) -> int:
    """Run the doctor; returns the exit status. ``http`` carries the upstream calls and the metadata
    probes, ``resolver`` the name lookups, ``runner`` the iptables commands (default: subprocesses)."""
    args = build_parser().parse_args(list(argv))
    report = Report(mode="unknown")
    config = _config_step(report, args, environ)
    if config is not None:
        report.mode = config.mode
        if config.node is None:
            await _sidecar(report, args, config, http=http, clock=clock)
        else:
            await _node(report, args, config, environ=environ, http=http, clock=clock, runner=runner)
    if config is None or args.metadata_address or config.node is None:
        await _metadata(report, args, http=http, resolver=resolver)
    out.write(render_json(report) + "\n" if args.json else render_human(report))
    return EXIT_OK if report.ok else EXIT_BROKEN


def _config_step(report: Report, args: argparse.Namespace, environ: Mapping[str, str]) -> Config | None:
    path = args.config or (Path(environ["METAEMU_CONFIG"]) if environ.get("METAEMU_CONFIG") else None)
    try:
        if path is None and args.credential_config is None:
            raise ConfigError("--config", "required (or METAEMU_CONFIG, or --credential-config)")
        config = load_config(path=path, credential_config=args.credential_config, env=dict(environ),
                             hostname=socket.gethostname())
        if args.pod and config.node is None:
            raise ConfigError("--pod", "only in node mode (mode: node)")
        if args.pod and args.pod.count("/") != 1:
            raise ConfigError("--pod", f"expected NAMESPACE/NAME, got {args.pod!r}")
    except ConfigError as exc:
        report.add(Check(name="config", status="fail", summary=str(exc), diagnosis="config.invalid",
                         fix=f"correct {exc.key} (README, Configuration reference)"))
        return None
    wi = config.workload_identity
    audience = config.node.audience if config.node else wi.audience if wi else ""
    report.add(Check(name="config", status="ok", summary=f"valid ({config.mode} mode)", details={
        "project": f"{config.project_id} ({config.numeric_project_id})", "audience": audience or "(none)",
        "sts": config.endpoints.sts, "iam_credentials": config.endpoints.iam_credentials}))
    return config


async def _sidecar(report: Report, args: argparse.Namespace, config: Config, *, http: HttpClient,
                   clock: Clock) -> None:
    try:
        chain = sidecar_chain(config, http=http, clock=clock)
    except ConfigError as exc:
        report.add(Check(name="subject token", status="fail", summary=str(exc), diagnosis="config.invalid"))
        for name in STEPS[1:]:
            report.not_run(name)
        return
    await run_chain(report, chain, clock=clock)


async def _node(report: Report, args: argparse.Namespace, config: Config, *, environ: Mapping[str, str],
                http: HttpClient, clock: Clock, runner: CommandRunner | None) -> None:
    node = config.node
    assert node is not None
    netfilter = Netfilter(iptables=args.iptables, ipv6=IPv6Mode(args.ipv6), runner=runner or SubprocessRunner())
    rule = interception_rule(config, pod_interfaces=tuple(args.pod_interface), node_interface=args.node_interface)
    if not await asyncio.to_thread(check_interception, report, rule, netfilter=netfilter):
        return _not_run(report, "pod", *STEPS)
    if not args.pod:
        report.add(Check(name="pod", status="skip", summary="pass --pod NAMESPACE/NAME to check one pod's chain"))
        return None
    namespace, name = args.pod.split("/")
    try:
        connection = (KubeConnection.from_kubeconfig(node.kubeconfig) if node.kubeconfig
                      else KubeConnection.in_cluster(environ))
    except ConfigError as exc:
        report.add(Check(name="pod", status="fail", summary="cannot reach the Kubernetes API", cause=str(exc),
                         diagnosis="k8s.unconfigured", fix="run it in the agent's pod, or set node.kubeconfig"))
        return _not_run(report, *STEPS)
    kube_http = KubeHttp(ssl_context=connection.ssl_context())
    try:
        kube = KubeClient(connection=connection, http=kube_http, stream=kube_http, clock=clock,
                          metrics=create_metrics())
        facts = ChainFacts(audience=node.audience, source_kind="tokenrequest", project_id=config.project_id)
        found = await check_pod(report, kube, node, namespace=namespace, name=name, facts=facts)
        if found is None:
            return _not_run(report, *STEPS)
        await run_chain(report, pod_chain(config, kube, found, http=http, clock=clock), clock=clock)
    finally:
        await kube_http.close()
    return None


async def _metadata(report: Report, args: argparse.Namespace, *, http: HttpClient, resolver: Resolver) -> None:
    if report.broken:
        return _not_run(report, "metadata names", "metadata server")
    address = args.metadata_address or DEFAULT_ADDRESS
    names = args.metadata_name or list(DEFAULT_NAMES)
    if not await check_names(report, names, address=address, resolver=resolver):
        return _not_run(report, "metadata server")
    await check_server(report, address=address, http=http)
    return None


def _not_run(report: Report, *names: str) -> None:
    for name in names:
        report.not_run(name)


def main(argv: Sequence[str], *, environ: Mapping[str, str], out: TextIO | None = None) -> int:
    from metaemu import eventloop
    from metaemu.doctor.reachability import system_resolver
    from metaemu.transport import AiohttpClient

    async def run() -> int:
        http = AiohttpClient()
        try:
            return await doctor(argv, environ=environ, clock=SystemClock(), http=http, resolver=system_resolver,
                                out=out or sys.stdout)
        finally:
            await http.close()

    return eventloop.run(run())
