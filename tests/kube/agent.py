"""The node agent on the real test bed: a fresh Node of the session's cluster per test, metaemu's
node agent on it, unmodified, authenticated as metaemu-system/metaemu by a real pod-bound
service-account token, with the shipped configuration of manifests/node/configmap.yaml, and a Google
stand-in that trusts the cluster's real issuer and JWKS.

The agent's time is a ``FakeClock`` (starting at the real now: the real server's tokens carry real
``iat``/``exp``; the Google stand-in keeps real time, as Google and the API server do) and its API
connection goes through ``FaultyKube``, so its waits (a new pod's grace,
a lookup's timeout, a long poll, a watch's backoff) pass only when a test advances virtual time, and
only while nothing is on the wire (``Agent.advance``, ``Agent.drive``): a real round trip takes no
virtual time, and no test waits out a real timer (issue #13)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from metaemu.config import parse_config
from metaemu.pods.agent import NodeAgent
from metaemu.pods.stream import KubeHttp
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.kube_faults import FaultyKube
from tests.helpers import FLAVOR, SA_PATH, sample
from tests.kube.cluster import ISSUER, KubeCluster, binaries_dir

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests" / "node"
AGENT_NAMESPACE, AGENT_SA = "metaemu-system", "metaemu"
AGENT_USER = f"system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SA}"
GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
T = TypeVar("T")
#: The kinds of the rendered manifests that shape what the agent may do in the API.
POLICY_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding"}


def rendered_manifests() -> list[dict[str, Any]]:
    """manifests/node as `kubectl kustomize` renders it (the kubectl built with the API server)."""
    kubectl = binaries_dir() / "kubectl"
    out = subprocess.run([str(kubectl), "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def shipped_config() -> dict[str, Any]:
    """The node-mode configuration in manifests/node/configmap.yaml, as shipped."""
    configmap = next(d for d in rendered_manifests() if d["kind"] == "ConfigMap")
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["metaemu.yaml"])
    return config


def unique(prefix: str) -> str:
    """A name no other test of the session uses (the cluster is shared; namespaces are never
    deleted, as no controller-manager would finish it)."""
    return f"{prefix}-{secrets.token_hex(4)}"


@dataclass
class Agent:
    """metaemu's node agent on ``node`` of the real cluster, with a Google stand-in that trusts the
    cluster's real issuer and JWKS."""

    cluster: KubeCluster
    node: str
    server: MetaemuServer
    google: FakeGoogle
    audience: str
    token: str  # the agent's own service-account token
    kubeconfig: Path
    clock: FakeClock
    kube: FaultyKube  # between the agent and the real API server
    ips: Iterator[str] = field(default_factory=lambda: _pod_ips())

    def subject_tokens(self) -> list[str]:
        """Every subject token the agent presented to STS (the TokenRequest tokens it got)."""
        return [r.form["subject_token"] for r in self.google.requests if r.endpoint == "sts"]

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.server.metrics, name, **labels)

    async def get(self, peer: str, path: str, headers: dict[str, str] | None = None) -> web.Response:
        """A request through the real handler whose TCP peer is ``peer`` (where the kernel reports it)."""
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda key, default=None: (peer, 40000) if key == "peername" else default
        request = make_mocked_request("GET", path, headers={"Host": "169.254.169.254", **FLAVOR, **(headers or {})},
                                      transport=transport)
        return await self.server.components.handler(request)

    async def advance(self, seconds: float) -> None:
        """Advance the agent's virtual time once nothing is on the wire."""
        await self._idle()
        self.clock.advance(seconds)
        await settle()

    async def drive(self, call: Awaitable[T], *, step_s: float = 0.5, limit_s: float = 60.0) -> tuple[T, float]:
        """Run ``call`` while advancing virtual time in steps whenever the wire is quiet; returns
        its result and the virtual seconds it took (0 when it needed no timer)."""
        task = asyncio.ensure_future(call)
        started = self.clock.monotonic()
        while True:
            await self._idle()
            if task.done():
                return task.result(), self.clock.monotonic() - started
            assert self.clock.monotonic() - started < limit_s, "the call did not finish in virtual time"
            self.clock.advance(step_s)

    async def _idle(self) -> None:
        while True:
            await self.kube.quiet()
            await settle()
            if self.kube.in_flight == 0:  # nothing set off by the answers that just arrived
                return

    async def token_for(self, peer: str) -> str:
        response = await self.get(peer, SA_PATH + "token")
        assert response.status == 200, response.text
        return str(json.loads(response.body)["access_token"])  # type: ignore[arg-type]

    def workload(self, namespace: str, name: str, *, gsa: str | None = None, sa: str = "app",
                 ip: str | None = None) -> tuple[str, str]:
        """A service account (annotated with ``gsa``, which Google lets it impersonate) and a Running pod
        of it on this node (at ``ip``, default the next free address); returns the pod's IP and UID."""
        annotations = {GSA_ANNOTATION: gsa} if gsa else None
        self.cluster.service_account(namespace, sa, annotations=annotations)
        if gsa:
            self.google.add_service_account(gsa)
            self.google.grant(gsa, self.google.principal_for(self.audience, f"system:serviceaccount:{namespace}:{sa}"))
        ip = ip or next(self.ips)
        uid = self.cluster.pod(namespace, name, node=self.node, service_account=sa, ip=ip, host_ip="169.254.29.1")
        return ip, uid

    async def until(self, what: str, predicate: Callable[[], bool], timeout_s: float = 20.0, *,
                    advance_s: float = 0.0) -> None:
        """Poll ``predicate`` (a metric, the pod index): the watch is a real socket to a real server.
        With ``advance_s``, virtual time moves on by that much per poll while the wire is quiet (for
        what waits on an agent timer too, a watch's retry backoff). ``timeout_s`` is real: it bounds
        the wait for real processes (an API server coming back), never stands in for an event."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            assert loop.time() < deadline, f"never saw {what}"
            await asyncio.sleep(0.02)
            if advance_s:
                await self.advance(advance_s)


def agent_of(agent: Agent) -> NodeAgent:
    """The node agent behind ``agent``'s server (its context provider in node mode)."""
    contexts = agent.server.components.contexts
    assert isinstance(contexts, NodeAgent)
    return contexts


def _pod_ips() -> Iterator[str]:
    """Pod addresses of one node (link-local: never a private or public range)."""
    return (f"169.254.{30 + i // 250}.{1 + i % 250}" for i in itertools.count())


def agent_token(cluster: KubeCluster, node: str) -> str:
    """The token kubelet would project into the agent's pod on ``node``: bound to that Pod, so it
    carries the ``authentication.kubernetes.io/node-name`` claim the node-taint policy checks."""
    pod = unique("metaemu-agent")
    uid = cluster.pod(AGENT_NAMESPACE, pod, node=node, service_account=AGENT_SA, ip="169.254.29.1",
                      host_ip="169.254.29.1", host_network=True)
    reply = cluster.token_request(AGENT_NAMESPACE, AGENT_SA, {
        "expirationSeconds": 3600, "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}})
    assert reply.status == 201, reply.body
    return str(reply.body["status"]["token"])


@contextlib.asynccontextmanager
async def started_agent(cluster: KubeCluster, tmp_path: Path, *, taints: list[dict[str, str]] | None = None,
                        **node_config: Any) -> AsyncIterator[Agent]:
    node = unique("node")
    cluster.node(node, taints=taints)
    token = agent_token(cluster, node)
    # The token inline, not a tokenFile: a file is read in a worker thread, real I/O that FaultyKube
    # cannot see, so virtual time could pass mid-request (tests/kube/test_kube_api_client.py covers
    # tokenFile).
    kubeconfig = cluster.kubeconfig(tmp_path / "agent.kubeconfig", token=token)
    raw = shipped_config()
    audience = str(raw["node"]["audience"])
    clock = FakeClock(start=dt.datetime.now(dt.UTC).replace(microsecond=0))
    google = FakeGoogle()  # Google's time is real, as the API server's is: it judges the real tokens' iat
    google.add_provider(WorkloadIdentityProvider(audience=audience, issuer=ISSUER, jwks=cluster.jwks()))
    raw.update(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", admin_socket=str(tmp_path / "admin.sock"),
               endpoints={"sts": "http://sts.test/v1/token", "iam_credentials": "http://iam.test/v1"})
    raw["node"].update(name=node, kubeconfig=str(kubeconfig), host_addresses=["169.254.29.1"], **node_config)
    if taints is None:
        raw["node"]["startup_taint"] = ""
    faulty: list[FaultyKube] = []

    def in_front(http: KubeHttp) -> FaultyKube:
        faulty.append(FaultyKube(http, clock=clock))
        return faulty[0]

    server = MetaemuServer(parse_config(raw, hostname=node, base_dir=tmp_path), clock=clock, http=google.client(),
                           kube_transport=in_front)
    await server.start()
    agent = Agent(cluster, node, server, google, audience, token, kubeconfig, clock, faulty[0])
    try:
        await agent.until("the agent ready", lambda: server.components.contexts.ready() is None)
        yield agent
    finally:
        await server.stop()


class WireTransport(asyncio.Transport):
    """A connection as the agent's listener would accept it from ``peer``, without a socket: the
    bytes a protocol writes are kept, and ``closed`` is set when it closes the connection. The
    peer address is the only thing it reports, exactly where the kernel's would be."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer
        self.out = bytearray()
        self.closed = asyncio.Event()
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed.is_set()

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            protocol = self.protocol
            if protocol is not None:
                asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closed.is_set()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def exchange(agent: Agent, peer: str, data: bytes, *, fast_path: bool = True) -> bytes:
    """``data`` sent on a new connection from ``peer``, then the client's EOF; everything the agent
    wrote until it closed the connection (virtual time advanced while it waits on its own timers)."""
    transport = WireTransport(peer)
    protocol = agent.server.metadata_connection(fast_path=fast_path)
    transport.protocol = protocol
    protocol.connection_made(transport)
    current = transport.get_protocol()  # the fast path may have handed the connection over
    assert isinstance(current, asyncio.Protocol)
    current.data_received(data)
    current = transport.get_protocol()
    assert isinstance(current, asyncio.Protocol)
    if not current.eof_received():
        transport.close()
    await agent.drive(transport.closed.wait())
    return bytes(transport.out)
