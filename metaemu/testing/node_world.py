"""A simulated node's whole world in one process, for node-mode tests: a Kubernetes API stand-in,
Google STS and IAM Credentials stand-ins that trust its service-account issuer, and metaemu itself in
``mode: node``. It is meant to run inside the node's network namespace of a simulated node
(tests/node/netns.py), so pods in their own namespaces reach metaemu through the real interception
rule, and metaemu sees their real addresses.

A control API on loopback (inside that namespace) lets the test change the cluster:

    POST   /pods                    {"namespace", "name", "service_account", "ip", "gsa"?, "host_network"?}
    DELETE /pods/{namespace}/{name}?grace=1   (grace: only mark terminating)
    GET    /token-info?token=...    what the Google stand-in knows of an access token (its email)
    GET    /node                    the node's taints, when metaemu's pod watch synced and when its
                                    startup-taint patches were applied (Unix times; SEC-02)

``python -m metaemu.testing.node_world --listen ADDR:PORT --control-port N --node NAME`` prints
``READY`` once metaemu's pod watch has synced, and stops cleanly on SIGTERM.

With ``--kubeconfig FILE --cluster-jwks FILE`` there is no Kubernetes stand-in: metaemu uses that
kubeconfig (a real API server; the test creates pods there) and the Google stand-in trusts the
real cluster's issuer and JWKS. The control API then has ``GET /token-info``, ``GET /state`` (when
the pod watch synced) and ``POST /grant`` ``{"gsa", "namespace", "service_account"}`` (the Google
account exists and that Kubernetes service account may impersonate it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from metaemu.config import parse_config
from metaemu.logs import setup_logging
from metaemu.pods.agent import NodeAgent
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.testing.fake_kubernetes import FakeKubernetes
from metaemu.testing.world import AUDIENCE, CLUSTER_ISSUER, PROJECT_ID, PROJECT_NUMBER

GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
#: The node registers with it, as the README's install guide asks; metaemu removes it once ready.
STARTUP_TAINT = {"key": "metaemu.dev/agent-not-ready", "value": "true", "effect": "NoSchedule"}


class NodeWorld:
    def __init__(self, *, node_name: str) -> None:
        self.node_name = node_name
        self.kube = FakeKubernetes(issuer=FakeIssuer(issuer=CLUSTER_ISSUER))
        self.google = FakeGoogle()
        self.google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=CLUSTER_ISSUER,
                                                          jwks=self.kube.issuer.jwks()))
        self.watch_synced_at: float | None = None

    def add_pod(self, spec: dict[str, Any]) -> None:
        namespace, sa = str(spec["namespace"]), str(spec.get("service_account", "default"))
        gsa = spec.get("gsa")
        if (namespace, sa) not in self.kube.store.service_accounts:
            self.kube.add_service_account(namespace, sa, annotations={GSA_ANNOTATION: gsa} if gsa else None)
        if gsa:
            self.google.add_service_account(str(gsa))
            subject = f"system:serviceaccount:{namespace}:{sa}"
            self.google.grant(str(gsa), self.google.principal_for(AUDIENCE, subject))
        self.kube.add_pod(namespace, str(spec["name"]), node=self.node_name, ips=[str(spec["ip"])],
                          service_account=sa, host_network=bool(spec.get("host_network", False)))

    def control_app(self) -> web.Application:
        async def add(request: web.Request) -> web.Response:
            self.add_pod(await request.json())
            return web.json_response({"ok": True})

        async def delete(request: web.Request) -> web.Response:
            grace = 30 if request.query.get("grace") else 0
            self.kube.delete_pod(request.match_info["ns"], request.match_info["name"], grace_period_s=grace)
            return web.json_response({"ok": True})

        async def token_info(request: web.Request) -> web.Response:
            info = self.google.token_info(request.query.get("token", ""))
            return web.json_response({"email": info.email if info else None,
                                      "principal": info.principal if info else None})

        async def node(request: web.Request) -> web.Response:
            return web.json_response({
                "taints": self.kube.node_taints(self.node_name), "watch_synced_at": self.watch_synced_at,
                "patches": [{"status": p.status, "applied_at": p.applied_at} for p in self.kube.node_patches]})

        app = web.Application()
        app.router.add_get("/node", node)
        app.router.add_post("/pods", add)
        app.router.add_delete("/pods/{ns}/{name}", delete)
        app.router.add_get("/token-info", token_info)
        return app


async def serve(*, listen: str, admin_listen: str, control_port: int, node_name: str,
                host_addresses: list[str], intercept_pod_interfaces: list[str]) -> None:
    world = NodeWorld(node_name=node_name)
    world.kube.add_node(node_name, taints=[STARTUP_TAINT])
    runners = []
    for app, port in ((world.kube.app(), 0), (world.control_app(), control_port)):
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)  # watch streams stay open
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    with tempfile.TemporaryDirectory(prefix="metaemu-node-") as tmp:
        kubeconfig = world.kube.kubeconfig(Path(tmp) / "kubeconfig",
                                           server=f"http://127.0.0.1:{runners[0].addresses[0][1]}")
        raw = _config(listen=listen, admin_listen=admin_listen, node_name=node_name, audience=AUDIENCE,
                      kubeconfig=kubeconfig, host_addresses=host_addresses,
                      intercept_pod_interfaces=intercept_pod_interfaces)
        server = MetaemuServer(parse_config(raw, hostname=node_name, base_dir=Path(tmp)), http=world.google.client())

        def synced() -> None:
            world.watch_synced_at = time.time()

        try:
            await _run_until_stopped(server, synced)
        finally:
            for runner in reversed(runners):
                await runner.cleanup()


async def serve_real(*, listen: str, admin_listen: str, control_port: int, node_name: str, host_addresses: list[str],
                     intercept_pod_interfaces: list[str], kubeconfig: Path, cluster_jwks: dict[str, Any],
                     audience: str) -> None:
    """metaemu in node mode against a real API server (see the module docstring)."""
    google = FakeGoogle()
    google.add_provider(WorkloadIdentityProvider(audience=audience, issuer=CLUSTER_ISSUER,
                                                 jwks=cluster_jwks))
    synced_at: list[float] = []

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

    control = web.Application()
    control.router.add_post("/grant", grant)
    control.router.add_get("/token-info", token_info)
    control.router.add_get("/state", state)
    runner = web.AppRunner(control, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    raw = _config(listen=listen, admin_listen=admin_listen, node_name=node_name, audience=audience,
                  kubeconfig=kubeconfig, host_addresses=host_addresses,
                  intercept_pod_interfaces=intercept_pod_interfaces)
    server = MetaemuServer(parse_config(raw, hostname=node_name, base_dir=kubeconfig.parent), http=google.client())
    try:
        await _run_until_stopped(server, lambda: synced_at.append(time.time()))
    finally:
        await runner.cleanup()


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
    p.add_argument("--listen", required=True)
    p.add_argument("--admin-listen", default="127.0.0.1:8081")
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--node", default="node-1")
    p.add_argument("--host-address", action="append", default=[])
    p.add_argument("--intercept-pod-interface", action="append", default=[],
                   help="keep node-setup's rules in place for these pod interfaces (needs NET_ADMIN)")
    p.add_argument("--kubeconfig", type=Path, help="a real API server instead of the stand-in")
    p.add_argument("--cluster-jwks", type=Path, help="with --kubeconfig: the cluster's /openid/v1/jwks")
    p.add_argument("--audience", default=AUDIENCE, help="with --kubeconfig: the Workload Identity provider")
    args = p.parse_args(argv)
    setup_logging("info")
    if args.kubeconfig is not None:
        if args.cluster_jwks is None:
            p.error("--kubeconfig needs --cluster-jwks")
        asyncio.run(serve_real(listen=args.listen, admin_listen=args.admin_listen, control_port=args.control_port,
                               node_name=args.node, host_addresses=args.host_address,
                               intercept_pod_interfaces=args.intercept_pod_interface, kubeconfig=args.kubeconfig,
                               cluster_jwks=json.loads(args.cluster_jwks.read_text()), audience=args.audience))
        return 0
    asyncio.run(serve(listen=args.listen, admin_listen=args.admin_listen, control_port=args.control_port,
                      node_name=args.node, host_addresses=args.host_address,
                      intercept_pod_interfaces=args.intercept_pod_interface))
    return 0


if __name__ == "__main__":
    sys.exit(main())
