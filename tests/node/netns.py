"""A simulated Kubernetes node built from network namespaces, for node-mode tests (issue #4).

``SimulatedNode`` creates, all inside namespaces it owns (nothing is configured in the caller's
namespace):

- a **node** namespace, the host network: the node-local address ``169.254.20.1/32`` on its
  loopback (where node-mode metaemu, or a stand-in, listens; on ``lo`` rather than a dummy link
  because not every kernel has the dummy driver), IP forwarding on, and an uplink ``eth0``
  (``169.254.30.1/24``) with the default route;
- a **cloud** namespace at the other end of that uplink standing in for the network beyond the node:
  the *real* metadata server's address ``169.254.169.254`` lives on its loopback, so a test can
  prove that a pod never reaches it (SEC-01, SEC-05, SEC-06);
- N **pod** namespaces, each joined to the node by a veth pair the way routed CNIs (Calico, AWS VPC
  CNI) do it: pod side ``eth0`` with ``169.254.20.(10+i)/24`` and a default route via the node,
  node side ``vethpod<i>`` with a host route to the pod. Each pod gets the ``hostAliases`` entry
  ``169.254.169.254 metadata.google.internal metadata`` (``ip netns exec`` bind-mounts
  ``/etc/netns/<ns>/hosts`` over ``/etc/hosts``).

A "hostNetwork pod" is a process run in the node namespace (``run_in(node.node_ns, ...)``).

Only link-local addresses (169.254.0.0/16) are used; they exist only inside these namespaces.
Names carry the pid and a sequence number, so concurrent runs never collide; ``close()`` (also on a
failed ``__enter__``) stops every process started through ``popen_in`` and deletes every namespace;
namespaces left by a run that was killed are removed by the next run (their pid is gone).
Needs root and iproute2. Every command has a bounded timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

#: Namespace name prefix; stale-namespace cleanup only touches names with this prefix.
PREFIX = "metaemu-sim"
NODE_IP = "169.254.20.1"
POD_NET = "169.254.20"
POD_PREFIX_LEN = 24
UPLINK_NODE_IP = "169.254.30.1"
UPLINK_CLOUD_IP = "169.254.30.2"
METADATA_IP = "169.254.169.254"
HOSTS = f"127.0.0.1 localhost\n{METADATA_IP} metadata.google.internal metadata\n"
#: iproute2 and sysctl finish in milliseconds; 20 s only bounds a wedged kernel or lock.
COMMAND_TIMEOUT_S = 20.0
#: Grace period for a started process to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 5.0
#: How long a responder may take to bind its ports (a Python start-up, ~100 ms).
RESPONDER_READY_S = 15.0

_SEQUENCE = itertools.count()

#: A tiny HTTP/1.1 server (keep-alive, threaded): answers every GET with JSON naming itself and the
#: TCP peer address it saw, and appends the same JSON as a line to its log file.
_RESPONDER = r"""
import json, sys, threading, http.server, socketserver
name, address, log_path, ports = sys.argv[1], sys.argv[2], sys.argv[3], [int(p) for p in sys.argv[4:]]
lock = threading.Lock()
def log(entry):
    with lock, open(log_path, "a") as f:
        f.write(json.dumps(entry) + "\n")
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        entry = {"server": name, "peer": self.client_address[0], "port": self.server.server_address[1],
                 "path": self.path, "host": self.headers.get("Host")}
        log(entry)
        body = json.dumps(entry).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def server_bind(self):  # skip HTTPServer's reverse DNS lookup (getfqdn): no resolver in here
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = address, self.server_address[1]
servers = [Server((address, p), Handler) for p in ports]
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
log({"ready": True})
threading.Event().wait()
"""

#: One keep-alive connection; a GET per path read from stdin, a JSON line per answer. Never reconnects.
_KEEPALIVE_CLIENT = r"""
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=float(sys.argv[3]))
c.connect()
c.auto_open = 0
for line in sys.stdin:
    try:
        c.request("GET", line.strip())
        r = c.getresponse()
        print(json.dumps({"server": json.loads(r.read())["server"]}), flush=True)
    except Exception as e:
        print(json.dumps({"error": type(e).__name__}), flush=True)
"""

#: One GET with http.client (no proxies, bounded timeout); prints an outcome as JSON.
_CLIENT = r"""
import errno, http.client, json, socket, sys, urllib.parse
url, timeout = sys.argv[1], float(sys.argv[2])
u = urllib.parse.urlsplit(url)
try:
    c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    c.request("GET", u.path or "/", headers={"Metadata-Flavor": "Google"})
    r = c.getresponse()
    raw = r.read().decode(errors="replace")
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"raw": raw[:2000]}
    print(json.dumps({"status": r.status, "body": body}))
except ConnectionRefusedError:
    print(json.dumps({"error": "refused"}))
except ConnectionResetError:
    print(json.dumps({"error": "reset"}))
except (TimeoutError, socket.timeout):
    print(json.dumps({"error": "timeout"}))
except OSError as e:
    print(json.dumps({"error": errno.errorcode.get(e.errno or 0, type(e).__name__)}))
except http.client.HTTPException as e:
    print(json.dumps({"error": type(e).__name__}))
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpOutcome:
    """What a client got: an HTTP status and JSON body, or an error word (``refused``, ``reset``,
    ``timeout``, an errno name such as ``EHOSTUNREACH``)."""

    status: int | None = None
    body: dict[str, Any] | None = None
    error: str | None = None

    @property
    def server(self) -> str | None:
        """Which responder answered (``None`` when nothing did)."""
        return None if self.body is None else self.body.get("server")


class Responder:
    """A running ``_RESPONDER`` process; ``requests()`` reads what it saw."""

    def __init__(self, process: subprocess.Popen[str], log_path: Path) -> None:
        self.process, self.log_path = process, log_path

    def requests(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        return [entry for entry in lines if "ready" not in entry]

    def peers(self) -> list[str]:
        return [entry["peer"] for entry in self.requests()]

    def stop(self) -> None:
        _stop(self.process)


class KeepAliveClient:
    """One TCP connection held open by a process in a namespace (for pre-existing-connection tests)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def get(self, path: str, *, timeout_s: float = 15.0) -> dict[str, str]:
        """Send a GET on the held connection; ``{"server": ...}`` or ``{"error": <exception name>}``."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(path + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            raise RuntimeError(f"the keep-alive client did not answer within {timeout_s} s")
        answer: dict[str, str] = json.loads(self.process.stdout.readline())
        return answer


class SimulatedNode:
    """A node, a cloud and pods in network namespaces; use as a context manager.

    Pods are numbered from 1; ``pod_ip(i)`` is ``169.254.20.(10+i)`` unless the pod was created
    with another address (``add_pod(ip=...)``, ``reuse_ip``).
    """

    def __init__(self, pods: int = 3, *, command_timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        self.tag = f"{PREFIX}-{os.getpid()}-{next(_SEQUENCE)}"
        self.node_ns = f"{self.tag}-node"
        self.cloud_ns = f"{self.tag}-cloud"
        self.node_ip = NODE_IP
        self.metadata_ip = METADATA_IP
        self._initial_pods = pods
        self._timeout_s = command_timeout_s
        self._namespaces: list[str] = []
        self._pods: dict[int, tuple[str, str]] = {}  # index -> (namespace, ip)
        self._processes: list[tuple[str, subprocess.Popen[str]]] = []  # (namespace, process)
        self._indices = itertools.count(1)  # never reused: a new pod never meets a stale interface name

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> SimulatedNode:
        try:
            remove_stale_namespaces()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop started processes, then delete every namespace (idempotent, never raises)."""
        for _, process in reversed(self._processes):
            with contextlib.suppress(Exception):
                _stop(process)
        self._processes.clear()
        for ns in reversed(self._namespaces):
            _delete_namespace(ns)
        self._namespaces.clear()
        self._pods.clear()

    def _build(self) -> None:
        self._add_namespace(self.node_ns)
        self._add_namespace(self.cloud_ns)
        n, c = self.node_ns, self.cloud_ns
        for ns in (n, c):
            self._ip(ns, "link", "set", "lo", "up")
        self._ip(n, "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        self.run_in(n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._ip(n, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", c)
        self._ip(n, "addr", "add", f"{UPLINK_NODE_IP}/24", "dev", "eth0")
        self._ip(n, "link", "set", "eth0", "up")
        self._ip(n, "route", "add", "default", "via", UPLINK_CLOUD_IP, "dev", "eth0")
        self._ip(c, "addr", "add", f"{UPLINK_CLOUD_IP}/24", "dev", "eth0")
        self._ip(c, "addr", "add", f"{METADATA_IP}/32", "dev", "lo")
        self._ip(c, "link", "set", "eth0", "up")
        self._ip(c, "route", "add", f"{POD_NET}.0/{POD_PREFIX_LEN}", "via", UPLINK_NODE_IP, "dev", "eth0")
        for _ in range(self._initial_pods):
            self.add_pod()

    # -- pods --------------------------------------------------------------------------------

    @property
    def pods(self) -> list[int]:
        return sorted(self._pods)

    def pod_ns(self, i: int) -> str:
        return self._pods[i][0]

    def pod_ip(self, i: int) -> str:
        return self._pods[i][1]

    @staticmethod
    def pod_interface(i: int) -> str:
        return f"vethpod{i}"

    def add_pod(self, *, ip: str | None = None) -> int:
        """Create a pod namespace wired to the node; returns its index."""
        i = next(self._indices)
        ip = ip or f"{POD_NET}.{10 + i}"
        if ip in {pod_ip for _, pod_ip in self._pods.values()}:
            raise ValueError(f"{ip} is still used by a live pod")
        ns, veth = f"{self.tag}-pod{i}", self.pod_interface(i)
        self._add_namespace(ns)
        self._pods[i] = (ns, ip)
        hosts = Path("/etc/netns") / ns
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts").write_text(HOSTS)
        self._ip(ns, "link", "set", "lo", "up")
        self._ip(self.node_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip(self.node_ns, "link", "set", veth, "up")
        self._ip(ns, "addr", "add", f"{ip}/{POD_PREFIX_LEN}", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(ns, "route", "add", "default", "via", NODE_IP, "dev", "eth0", "onlink")
        self._ip(self.node_ns, "route", "replace", f"{ip}/32", "dev", veth, "src", NODE_IP)
        return i

    def remove_pod(self, i: int) -> None:
        """Delete pod ``i``'s namespace (its veth pair and the node's host route go with it)."""
        ns, _ = self._pods.pop(i)
        for process_ns, process in self._processes:
            if process_ns == ns:
                _stop(process)
        _delete_namespace(ns)
        self._namespaces.remove(ns)

    def reuse_ip(self, old: int) -> int:
        """Delete pod ``old`` and create a new pod with its address (IP reuse, SEC-10); returns
        the new pod's index."""
        ip = self.pod_ip(old)
        self.remove_pod(old)
        return self.add_pod(ip=ip)

    # -- running things ----------------------------------------------------------------------

    @staticmethod
    def exec_prefix(ns: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", ns)

    def run_in(self, ns: str, *cmd: str, timeout_s: float | None = None, check: bool = True,
               input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in namespace ``ns`` and wait (bounded); raises on a non-zero exit when
        ``check``, with the command's stderr in the message."""
        result = subprocess.run([*self.exec_prefix(ns), *cmd], capture_output=True, text=True, input=input_text,
                                timeout=timeout_s or self._timeout_s, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {ns} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def popen_in(self, ns: str, *cmd: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``cmd`` in ``ns`` in its own process group; it is stopped by ``close()``."""
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        process: subprocess.Popen[str] = subprocess.Popen([*self.exec_prefix(ns), *cmd], text=True,
                                                          start_new_session=True, **kwargs)
        self._processes.append((ns, process))
        return process

    def start_responder(self, ns: str, *, name: str, address: str, ports: Sequence[int],
                        log_dir: Path) -> Responder:
        """Start an HTTP responder in ``ns`` bound to ``address`` on ``ports``; returns once it
        listens (bounded by ``RESPONDER_READY_S``)."""
        log_path = log_dir / f"{name}-{next(_SEQUENCE)}.jsonl"
        process = self.popen_in(ns, sys.executable, "-c", _RESPONDER, name, address, str(log_path),
                                *map(str, ports), stderr=subprocess.PIPE)
        deadline = time.monotonic() + RESPONDER_READY_S
        while not (log_path.exists() and '"ready"' in log_path.read_text()):
            if process.poll() is not None:
                raise RuntimeError(f"responder {name} exited: {process.communicate()[1][-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"responder {name} did not start in {RESPONDER_READY_S} s")
            time.sleep(0.05)  # a child process binding its ports: poll, bounded
        return Responder(process, log_path)

    def keepalive_client(self, ns: str, host: str, *, port: int = 80, timeout_s: float = 3.0) -> KeepAliveClient:
        """Open one connection from ``ns`` to ``host:port`` and keep it for ``KeepAliveClient.get``."""
        process = self.popen_in(ns, sys.executable, "-c", _KEEPALIVE_CLIENT, host, str(port), str(timeout_s),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return KeepAliveClient(process)

    def http_get(self, ns: str, url: str, *, timeout_s: float = 3.0) -> HttpOutcome:
        """GET ``url`` from namespace ``ns`` with a fresh connection; never raises on network errors."""
        result = self.run_in(ns, sys.executable, "-c", _CLIENT, url, str(timeout_s), timeout_s=timeout_s + 15)
        return HttpOutcome(**json.loads(result.stdout))

    # -- internals ---------------------------------------------------------------------------

    def _add_namespace(self, ns: str) -> None:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=self._timeout_s)
        self._namespaces.append(ns)

    def _ip(self, ns: str, *args: str) -> None:
        result = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, timeout=self._timeout_s,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"ip -n {ns} {' '.join(args)}: {result.stderr.strip()}")


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM the process group we created for ``process``, then SIGKILL after a grace period."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_GRACE_S)


def _delete_namespace(ns: str) -> None:
    with contextlib.suppress(Exception):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
    shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def remove_stale_namespaces() -> None:
    """Delete ``metaemu-sim-<pid>-*`` namespaces whose creating process no longer exists."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                             check=False)
    for line in listing.stdout.splitlines():
        name = line.split(" ", 1)[0]
        parts = name.split("-")
        if not name.startswith(f"{PREFIX}-") or len(parts) < 4 or not parts[2].isdigit():
            continue
        if not Path(f"/proc/{parts[2]}").exists():
            _delete_namespace(name)
