"""metaemu in ``mode: node`` for a simulated node, against a real API server: run inside the node's
network namespace (tests/node/netns.py, tests/kube/test_simulated_node.py), so pods in their own
namespaces reach it through the real interception rule and it sees their real addresses. Its
Kubernetes is the test bed's kube-apiserver (``--kubeconfig``; the test creates and deletes pods
there); its Google is the in-process STS / IAM Credentials stand-in, trusting the real cluster's
issuer and JWKS (``--cluster-jwks``).

A control API on loopback (inside that namespace), for what only the Google stand-in knows:

    POST /grant              {"gsa", "namespace", "service_account"}: the Google account exists and
                             that Kubernetes service account may impersonate it
    GET  /token-info?token=  what the Google stand-in knows of an access token (email, principal)
    GET  /state              when metaemu's pod watch synced (Unix time; SEC-02)
    GET  /calls              requests the Google stand-in has answered, by endpoint

``python -m metaemu.testing.node_world --listen ADDR:PORT --control-port N --node NAME --kubeconfig F
--cluster-jwks F [--passthrough aws --passthrough-address ADDR:PORT] [--google-latency-seconds S]`` prints
``READY`` once metaemu is ready (watch synced, rules in place) and stops cleanly on SIGTERM.
``--google-latency-seconds`` delays every answer of the Google stand-in (``FakeGoogle(latency_s=...)``),
as a distant region would.

With ``--google-port N`` instead of ``--listen`` it runs no metaemu: the Google stand-in serves on
127.0.0.1:N (STS at ``/v1/token``, IAM Credentials under ``/v1``) for real ``metaemu serve``
processes to share (the upgrade tests run two at once); it prints ``READY`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from metaemu import eventloop
from metaemu.config import parse_config
from metaemu.logs import setup_logging
from metaemu.pods.agent import NodeAgent
from metaemu.server.runner import MetaemuServer, freeze_startup_heap
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.world import AUDIENCE, CLUSTER_ISSUER, PROJECT_ID, PROJECT_NUMBER


async def serve(*, listen: str, admin_listen: str, control_port: int, node_name: str, host_addresses: list[str],
                     intercept_pod_interfaces: list[str], kubeconfig: Path, cluster_jwks: dict[str, Any],
                     audience: str, node_options: dict[str, Any] | None = None,
                     google_latency_s: float = 0.0) -> None:
    """metaemu in node mode against a real API server (see the module docstring); every STS and
    IAM Credentials answer of the stand-in takes ``google_latency_s`` seconds."""
    google = _google(cluster_jwks, audience, latency_s=google_latency_s)
    synced_at: list[float] = []
    runner = await _start(_control_app(google, audience, synced_at), control_port)
    raw = _config(listen=listen, admin_listen=admin_listen, node_name=node_name, audience=audience,
                  kubeconfig=kubeconfig, host_addresses=host_addresses,
                  intercept_pod_interfaces=intercept_pod_interfaces)
    raw["node"].update(node_options or {})
    server = MetaemuServer(parse_config(raw, hostname=node_name, base_dir=kubeconfig.parent), http=google.client())
    try:
        await _run_until_stopped(server, lambda: synced_at.append(time.time()))
    finally:
        await runner.cleanup()


async def serve_google(*, google_port: int, control_port: int, cluster_jwks: dict[str, Any], audience: str) -> None:
    """The Google stand-in alone, over HTTP (see the module docstring)."""
    google = _google(cluster_jwks, audience)
    control = await _start(_control_app(google, audience, []), control_port)
    api = await _start(google.app(), google_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    try:
        await stop.wait()
    finally:
        await api.cleanup()
        await control.cleanup()


def _google(cluster_jwks: dict[str, Any], audience: str, *, latency_s: float = 0.0) -> FakeGoogle:
    google = FakeGoogle(latency_s={"sts": latency_s, "iam": latency_s})
    google.add_provider(WorkloadIdentityProvider(audience=audience, issuer=CLUSTER_ISSUER, jwks=cluster_jwks))
    return google


def _control_app(google: FakeGoogle, audience: str, synced_at: list[float]) -> web.Application:
    async def grant(request: web.Request) -> web.Response:
        spec = await request.json()
        gsa = str(spec["gsa"])
        google.add_service_account(gsa)
        subject = f"system:serviceaccount:{spec['namespace']}:{spec['service_account']}"
        google.grant(gsa, google.principal_for(audience, subject))
        return web.json_response({"ok": True})

    async def token_info(request: web.Request) -> web.Response:
        info = google.token_info(request.query.get("token", ""))
        return web.json_response({"email": info.email if info else None,
                                  "principal": info.principal if info else None})

    async def state(request: web.Request) -> web.Response:
        return web.json_response({"watch_synced_at": synced_at[0] if synced_at else None})

    async def calls(request: web.Request) -> web.Response:
        return web.json_response(dict(google.calls))

    control = web.Application()
    control.router.add_post("/grant", grant)
    control.router.add_get("/token-info", token_info)
    control.router.add_get("/state", state)
    control.router.add_get("/calls", calls)
    return control


async def _start(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _config(*, listen: str, admin_listen: str, node_name: str, audience: str, kubeconfig: Path,
            host_addresses: list[str], intercept_pod_interfaces: list[str]) -> dict[str, Any]:
    """metaemu's node-mode configuration, its Google calls going to the in-process stand-in."""
    return {"mode": "node", "listen": listen, "admin_listen": admin_listen, "profile": "gke",
            "project_id": PROJECT_ID, "numeric_project_id": PROJECT_NUMBER,
            "node": {"name": node_name, "audience": audience, "kubeconfig": str(kubeconfig),
                     "host_addresses": host_addresses, "intercept_pod_interfaces": intercept_pod_interfaces},
            "endpoints": {"sts": "http://sts.googleapis.test/v1/token",
                          "iam_credentials": "http://iamcredentials.test/v1"}}


async def _run_until_stopped(server: MetaemuServer, on_synced: Callable[[], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    freeze_startup_heap()  # as serve_until_signalled does
    agent = server.components.contexts
    assert isinstance(agent, NodeAgent)

    async def record_sync() -> None:
        await agent.index.wait_synced()
        on_synced()

    recorder = asyncio.create_task(record_sync())
    try:
        while agent.ready() is not None and not stop.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # ready() joins the watch sync and the rules: no single event
        print("READY", flush=True)
        await stop.wait()
    finally:
        recorder.cancel()
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metaemu.testing.node_world")
    p.add_argument("--listen", help="run metaemu on this address (or --google-port)")
    p.add_argument("--google-port", type=int, help="serve only the Google stand-in, on 127.0.0.1:N")
    p.add_argument("--admin-listen", default="127.0.0.1:8081")
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--node", default="node-1")
    p.add_argument("--host-address", action="append", default=[])
    p.add_argument("--intercept-pod-interface", action="append", default=[],
                   help="keep node-setup's rules in place for these pod interfaces (needs NET_ADMIN)")
    p.add_argument("--kubeconfig", type=Path, help="the agent's kubeconfig for a real API server (with --listen)")
    p.add_argument("--cluster-jwks", type=Path, required=True, help="the cluster's /openid/v1/jwks")
    p.add_argument("--audience", default=AUDIENCE, help="the Workload Identity provider")
    p.add_argument("--rate-limit-per-second", type=float, help="node.rate_limit_per_second (default: the product's)")
    p.add_argument("--rate-limit-burst", type=int, help="node.rate_limit_burst (default: the product's)")
    p.add_argument("--passthrough", action="append", default=[], help="node.passthrough (aws, azure; repeatable)")
    p.add_argument("--passthrough-address", help="node.passthrough_address (default: the product's)")
    p.add_argument("--google-latency-seconds", type=float, default=0.0,
                   help="delay every STS and IAM Credentials answer of the Google stand-in (default: none)")
    args = p.parse_args(argv)
    setup_logging("info")
    jwks = json.loads(args.cluster_jwks.read_text())
    if args.google_port is not None:
        eventloop.run(serve_google(google_port=args.google_port, control_port=args.control_port, cluster_jwks=jwks,
                                   audience=args.audience))
        return 0
    if args.listen is None or args.kubeconfig is None:
        p.error("--listen and --kubeconfig are required without --google-port")
    options: dict[str, Any] = {k: v for k, v in (("rate_limit_per_second", args.rate_limit_per_second),
                                                 ("rate_limit_burst", args.rate_limit_burst),
                                                 ("passthrough_address", args.passthrough_address)) if v is not None}
    if args.passthrough:
        options["passthrough"] = args.passthrough
    eventloop.run(serve(listen=args.listen, admin_listen=args.admin_listen, control_port=args.control_port,
                        node_name=args.node, host_addresses=args.host_address,
                        intercept_pod_interfaces=args.intercept_pod_interface, kubeconfig=args.kubeconfig,
                        cluster_jwks=jwks, audience=args.audience,
                        node_options=options, google_latency_s=args.google_latency_seconds))
    return 0

if __name__ == "__main__":
    sys.exit(main())
