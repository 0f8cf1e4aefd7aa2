"""A real Kubernetes control plane for tests: etcd and kube-apiserver, built from their published
sources by scripts/kube-testenv.sh, run as child processes on loopback and stopped by PID.

etcd listens on Unix sockets in the cluster's directory (no TCP port at all). kube-apiserver cannot
bind port 0 and report it, so it binds a fixed port on an address of its own in 127.0.0.0/8
(16 million to choose from, picked at random; another address is tried if that one is taken): no
bind-close-rebind race with other processes' ports.

No kubelet, scheduler or controller-manager runs: tests create Nodes, ServiceAccounts and Pods through
the API (``spec.nodeName`` set at creation), set pod status through the ``status`` subresource as a
kubelet would, and delete pods with ``gracePeriodSeconds: 0`` (nobody else would finish a graceful
deletion).

Authentication: a static token for the admin (``system:masters``) and real service-account tokens
(TokenRequest) for everyone else; authorization is RBAC only; ValidatingAdmissionPolicy is on (GA).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import ipaddress
import json
import os
import random
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
TESTENV = ROOT / "scripts" / "kube-testenv.sh"
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN = "metaemu-test-admin"
#: Bounds for a child process to come up: generous, since CI machines are slow, and only ever
#: waited in full when something is broken (then the error says what the process logged).
START_TIMEOUT_S = 90.0
#: Service ClusterIPs are only allocated, never routed: a link-local range keeps even the
#: allocation off private and public ranges.
SERVICE_CIDR = "169.254.200.0/24"


class KubeTestbedError(RuntimeError):
    """The test bed cannot be built or started; the message says why (never a silent skip)."""


@functools.cache
def binaries_dir() -> Path:
    """Build (first run) or find (cached) kube-apiserver, kubectl and etcd; progress goes to stderr."""
    proc = subprocess.run(["bash", str(TESTENV), "--print-dir"], stdout=subprocess.PIPE, stderr=None,
                          text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise KubeTestbedError(f"scripts/kube-testenv.sh failed (exit {proc.returncode}); its output above says why")
    return Path(proc.stdout.strip())


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any]


class KubeCluster:
    def __init__(self, *, bin_dir: Path, workdir: Path) -> None:
        self.bin_dir = bin_dir
        self.dir = workdir
        self.admin_token = secrets.token_urlsafe(32)
        self.host = ""
        self.port = 6443
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._write_pki()
        self._ssl = ssl.create_default_context(cafile=str(self.ca_file))

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._apiserver is not None and self._apiserver.poll() is None

    @property
    def etcd_socket(self) -> Path:
        return self.dir / "etcd.sock"

    def start(self) -> None:
        self.start_etcd()
        self.start_apiserver()

    def stop(self) -> None:
        self.stop_apiserver()
        _stop(self._etcd)
        self._etcd = None

    def start_etcd(self) -> None:
        client, peer = f"unix://{self.etcd_socket}", f"unix://{self.dir / 'etcd-peer.sock'}"
        log = (self.dir / "etcd.log").open("ab")
        self._etcd = subprocess.Popen(
            [str(self.bin_dir / "etcd"), "--name=metaemu-test", f"--data-dir={self.dir / 'etcd-data'}",
             f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
             f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
             f"--initial-cluster=metaemu-test={peer}", "--log-level=warn", "--unsafe-no-fsync"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait("etcd", self._etcd, lambda: self._etcd_call("/health").get("health") == "true")

    def start_apiserver(self) -> None:
        for _attempt in range(5):
            if not self.host:
                self.host = str(ipaddress.ip_address(random.randrange(0x7F010000, 0x7FFFFFFE)))
            self._write_serving_cert()
            log_path = self.dir / "kube-apiserver.log"
            log_start = log_path.stat().st_size if log_path.exists() else 0
            self._apiserver = subprocess.Popen(self._apiserver_argv(), stdout=log_path.open("ab"),
                                               stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self._wait("kube-apiserver", self._apiserver, self._ready)
                return
            except KubeTestbedError:
                logged = log_path.read_bytes()[log_start:]
                if b"address already in use" not in logged:
                    raise
                self.host = ""  # somebody holds this address's port: another address
        raise KubeTestbedError("kube-apiserver found no free loopback address in 5 attempts")

    def stop_apiserver(self) -> None:
        _stop(self._apiserver)
        self._apiserver = None

    @contextlib.contextmanager
    def standby_apiserver(self) -> Iterator[None]:
        """While the API server is stopped: another instance of it (same etcd, keys and tokens) on
        another loopback address, which this object's calls go to until the block ends. Clients of
        the stopped one (the agent) see an outage while the cluster changes."""
        assert not self.running, "stop the API server first"
        main_host, self.host = self.host, ""
        try:
            self.start_apiserver()  # a fresh address, with its own serving certificate
            yield
        finally:
            self.stop_apiserver()
            self.host = main_host

    def apiserver_in(self, exec_prefix: tuple[str, ...], name: str) -> subprocess.Popen[bytes]:
        """A second API server of this cluster (same etcd, keys and tokens) started with
        ``exec_prefix`` (``ip netns exec NS``) on that network namespace's own 127.0.0.1:6443, for an
        agent that cannot reach this namespace's loopback. The caller stops it (``stop_process``);
        clients retry until it is ready, as they would during a control-plane restart."""
        cert, key = self.dir / f"serving-{name}.crt", self.dir / f"serving-{name}.key"
        self._write_serving_cert(host="127.0.0.1", cert=cert, key=key)
        log = (self.dir / f"kube-apiserver-{name}.log").open("ab")
        return subprocess.Popen([*exec_prefix, *self._apiserver_argv(host="127.0.0.1", cert=cert, key=key)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _apiserver_argv(self, *, host: str | None = None, cert: Path | None = None,
                        key: Path | None = None) -> list[str]:
        host = host or self.host
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=unix://{self.etcd_socket}",
            f"--bind-address={host}", f"--advertise-address={host}", f"--secure-port={self.port}",
            f"--tls-cert-file={cert or self.dir / 'serving.crt'}",
            f"--tls-private-key-file={key or self.dir / 'serving.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={self.dir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--anonymous-auth=false",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={self.dir / 'sa.key'}",
            f"--service-account-signing-key-file={self.dir / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # The "kubernetes" Service would advertise a loopback endpoint; nothing here needs it.
            "--endpoint-reconciler-type=none",
            "--enable-priority-and-fairness=false",
            # A compaction in tests must reach watchers: the apiserver's own periodic one stays off.
            "--etcd-compaction-interval=0",
            f"--cert-dir={self.dir / 'certs'}",
            "--v=1",
        ]

    def _wait(self, name: str, proc: subprocess.Popen[bytes], ready: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise KubeTestbedError(f"{name} exited with status {proc.returncode}; see {self.dir}/{name}.log")
            try:
                if ready():
                    return
            except (OSError, ValueError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                _stop(proc)
                raise KubeTestbedError(f"{name} not ready after {START_TIMEOUT_S:.0f} s; see {self.dir}/{name}.log")
            time.sleep(0.1)  # a child process coming up: there is no event to await

    def _ready(self) -> bool:
        return self.request("GET", "/readyz").status == 200

    # -- PKI ---------------------------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    def _write_pki(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metaemu-test-ca")])
        now = datetime.datetime.now(datetime.UTC)
        self._ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                         .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
                         .not_valid_before(now - datetime.timedelta(minutes=5))
                         .not_valid_after(now + datetime.timedelta(days=1))
                         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                         .sign(self._ca_key, hashes.SHA256()))
        self.ca_file.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(self.dir / "sa.key", sa_key)
        (self.dir / "tokens.csv").write_text(f'{self.admin_token},{ADMIN},{ADMIN},"system:masters"\n')
        self.dir.joinpath("tokens.csv").chmod(0o600)

    def _write_serving_cert(self, *, host: str | None = None, cert: Path | None = None,
                            key: Path | None = None) -> None:
        host, cert_path, key_path = host or self.host, cert or self.dir / "serving.crt", key or self.dir / "serving.key"
        private = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
                .issuer_name(self._ca_cert.subject).public_key(private.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                               critical=False)
                .sign(self._ca_key, hashes.SHA256()))
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, private)

    # -- API ---------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                content_type: str = "application/json", accept: str = "application/json",
                impersonate: str | None = None) -> Reply:
        """One API call (admin unless ``token``); returns the status and decoded body, never raises on
        an HTTP error status."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token or self.admin_token}", "Accept": accept,
            **({"Content-Type": content_type} if data is not None else {}),
            **({"Impersonate-User": impersonate} if impersonate else {})})
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=30) as resp:
                return Reply(resp.status, _json(resp.read()))
        except urllib.error.HTTPError as err:
            return Reply(err.code, _json(err.read()))

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        reply = self.request(method, path, body, **kw)
        assert reply.status in (200, 201), f"{method} {path}: {reply.status} {reply.body}"
        return reply.body

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of one object (the admin is the field manager)."""
        path = _object_path(obj) + "?fieldManager=metaemu-tests&force=true"
        return self.ok("PATCH", path, obj, content_type="application/apply-patch+yaml")

    def jwks(self) -> dict[str, Any]:
        return self.ok("GET", "/openid/v1/jwks", accept="application/jwk-set+json")

    def kubeconfig(self, path: Path, *, token: str | None = None, token_file: Path | None = None,
                   server: str | None = None) -> Path:
        user: dict[str, str] = {"tokenFile": str(token_file)} if token_file else {"token": token or self.admin_token}
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": server or self.server,
                                                       "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "test", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
        path.chmod(0o600)
        return path

    def kubectl(self, *args: str, kubeconfig: Path | None = None, stdin: str | None = None,
                ) -> subprocess.CompletedProcess[str]:
        """The kubectl built with the API server, as the admin unless ``kubeconfig`` says otherwise."""
        config = kubeconfig or self.kubeconfig(self.dir / "admin.kubeconfig")
        return subprocess.run([str(self.bin_dir / "kubectl"), f"--kubeconfig={config}", *args], input=stdin,
                              capture_output=True, text=True, timeout=60, check=False)

    # -- objects, as a kubelet and an admin would make them ----------------------------------------

    def ensure_namespace(self, name: str) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def service_account(self, namespace: str, name: str, *, annotations: dict[str, str] | None = None) -> str:
        self.ensure_namespace(namespace)
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "annotations": annotations or {}}
        return str(self.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})["metadata"]["uid"])

    def node(self, name: str, *, taints: list[dict[str, str]] | None = None) -> dict[str, Any]:
        return self.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                           "spec": {"taints": taints or []}})

    def pod(self, namespace: str, name: str, *, node: str, service_account: str = "default",
            ip: str | None = None, host_ip: str | None = None, host_network: bool = False) -> str:
        """Create a pod scheduled on ``node``; with ``ip``, also mark it Running with that address."""
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
                "spec": {"nodeName": node, "serviceAccountName": service_account, "hostNetwork": host_network,
                         "automountServiceAccountToken": False,
                         "containers": [{"name": "app", "image": "registry.invalid/app:1"}]}}
        uid = str(self.ok("POST", f"/api/v1/namespaces/{namespace}/pods", body)["metadata"]["uid"])
        if ip is not None:
            self.pod_status(namespace, name, ip=ip, host_ip=host_ip or ip)
        return uid

    def pod_status(self, namespace: str, name: str, *, ip: str, host_ip: str, phase: str = "Running") -> None:
        """What a kubelet reports once the sandbox has an address (the ``status`` subresource)."""
        status = {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host_ip,
                  "hostIPs": [{"ip": host_ip}]}
        self.ok("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": status},
                content_type="application/merge-patch+json")

    def delete_pod(self, namespace: str, name: str) -> None:
        self.ok("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", {"gracePeriodSeconds": 0})

    def token_request(self, namespace: str, service_account: str, spec: dict[str, Any], *,
                      token: str | None = None, impersonate: str | None = None) -> Reply:
        return self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
                            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
                            token=token, impersonate=impersonate)

    def wait_until(self, what: str, predicate: Any, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll a condition of the server (policies loading, a watch cache catching up)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise KubeTestbedError(f"kube-apiserver: {what} not after {timeout_s:.0f} s")
            time.sleep(0.1)

    # -- etcd ---------------------------------------------------------------------------------------

    def compact_etcd(self) -> int:
        """Compact etcd's whole history up to its current revision (physically); returns it."""
        revision = int(self._etcd_call("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
        self._etcd_call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def _etcd_call(self, path: str, body: Any = None) -> dict[str, Any]:
        """etcd's HTTP gateway over its Unix socket (urllib speaks no AF_UNIX: a raw HTTP/1.0 exchange)."""
        payload = json.dumps(body).encode() if body is not None else b""
        method = "POST" if body is not None else "GET"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.etcd_socket))
            sock.sendall(f"{method} {path} HTTP/1.0\r\nHost: etcd\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        head, _, body_bytes = b"".join(chunks).partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise ValueError(f"etcd {path}: {head[:100]!r} {body_bytes[:300]!r}")
        return _json(body_bytes)


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {"raw": data.decode(errors="replace")}
    return value if isinstance(value, dict) else {"value": value}


def _object_path(obj: dict[str, Any]) -> str:
    kind, meta = obj["kind"], obj["metadata"]
    group_version = obj["apiVersion"]
    base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    plural = {"Namespace": "namespaces", "ServiceAccount": "serviceaccounts", "Node": "nodes", "Pod": "pods",
              "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings",
              "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
              "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
              "ConfigMap": "configmaps", "DaemonSet": "daemonsets", "Role": "roles",
              "RoleBinding": "rolebindings"}[kind]
    namespace = meta.get("namespace")
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{base}{scope}/{plural}/{meta['name']}"


def _write_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    _stop(proc)


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM the child (and its session), then SIGKILL if it has not exited within 15 s."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
