"""Run real, unmodified Google client libraries against a metadata server on loopback.

Drivers (see ``shared/spec/clients.md``; install them with ``scripts/install-clients.sh``):

* Node: ``tests/clients/node/client.js`` (``gcp-metadata`` + ``google-auth-library``, pinned by the lockfile);
* Go: ``tests/clients/go`` (``cloud.google.com/go/compute/metadata``, ``golang.org/x/oauth2/google`` and
  ``google.golang.org/api/idtoken``): Debian's packages in GOPATH mode, or the current releases pinned by
  its go.mod + go.sum;
* gcloud: the preinstalled CLI, when it is on ``PATH``.

Every client process is started with :func:`client_env`, which builds a minimal environment from scratch
(nothing is inherited but ``PATH`` and locale variables) with all three ``GCE_METADATA_*`` overrides pointing
at the loopback server, a fresh ``HOME`` and ``CLOUDSDK_CONFIG``, and no ADC / project / residency
variables (clients.md §1.1, §2, CL-13). Each ``run_*`` helper re-checks that environment before it starts the
client, so no client can fall back to 169.254.169.254 or ``metadata.google.internal``.

Typical use::

    env = client_env(server_addr, tmp_path)          # server_addr == "127.0.0.1:PORT"
    out = run_node_client(env, "https://example.test/aud")
    assert out["access_token"] == expected_token
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "CLIENTS_DIR",
    "DEFAULT_TIMEOUT",
    "GO_DIR",
    "METADATA_ENV_VARS",
    "NODE_DIR",
    "build_go_client",
    "client_env",
    "gcloud_available",
    "go_available",
    "jwt_claims",
    "node_available",
    "run_gcloud",
    "run_go_client",
    "run_node_client",
]

CLIENTS_DIR = Path(__file__).resolve().parent
NODE_DIR = CLIENTS_DIR / "node"
GO_DIR = CLIENTS_DIR / "go"
GOPATH = Path("/usr/share/gocode")

#: Wall-clock bound for every client subprocess (seconds).
DEFAULT_TIMEOUT = 60.0

#: Must all be set, to the loopback server, for every client process (clients.md §2, CL-13).
METADATA_ENV_VARS = ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT")

#: Must never reach a client process (clients.md §1.1): ADC files, project overrides, residency hints,
#: detection shortcuts, and proxies (which could route loopback traffic elsewhere).
FORBIDDEN_ENV_VARS = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "GCLOUD_PROJECT",
    "CLOUDSDK_CORE_PROJECT",
    "CLOUDSDK_CORE_ACCOUNT",
    "K_SERVICE",
    "FUNCTION_NAME",
    "CLOUD_RUN_JOB",
    "METADATA_SERVER_DETECTION",
    "NO_GCE_CHECK",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)

#: Inherited from the test process; everything else is dropped.
_PASSTHROUGH_ENV_VARS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SYSTEMROOT")

_FORBIDDEN_HOSTS = ("169.254.169.254", "metadata.google.internal", "fd20:ce::254")

_go_lock = threading.Lock()
_go_binaries: dict[str, Path] = {}


# --------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------


def _check_loopback_addr(metadata_addr: str) -> None:
    assert "/" not in metadata_addr, (
        f"metadata_addr must be HOST:PORT (no scheme/path), got {metadata_addr!r}"
    )
    host, _, port = metadata_addr.rpartition(":")
    assert host, f"metadata_addr needs HOST:PORT, got {metadata_addr!r}"
    assert port.isdigit(), f"metadata_addr needs a numeric port, got {metadata_addr!r}"
    assert 0 < int(port) < 65536, f"metadata_addr port out of range: {metadata_addr!r}"
    host = host.strip("[]")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        assert loopback, f"metadata_addr must be on loopback, got {metadata_addr!r}"


def _check_env(env: dict[str, str]) -> None:
    """CL-13: refuse to start a client whose environment could reach the real metadata server."""
    for name in METADATA_ENV_VARS:
        value = env.get(name, "")
        assert value, f"{name} is not set: refusing to start a client that could reach 169.254.169.254"
        assert not any(h in value for h in _FORBIDDEN_HOSTS), f"{name}={value!r} names a real metadata host"
        _check_loopback_addr(value)
    leaked = [name for name in FORBIDDEN_ENV_VARS if name in env]
    assert not leaked, f"isolation variables present in client env: {leaked}"
    for name in ("HOME", "CLOUDSDK_CONFIG"):
        assert env.get(name), f"{name} is not set in client env"


def client_env(metadata_addr: str, tmp_path: Path) -> dict[str, str]:
    """Return the isolated environment for a client talking to the metadata server at ``metadata_addr``.

    ``metadata_addr`` is ``HOST:PORT`` on loopback (e.g. ``"127.0.0.1:8080"``). ``HOME`` and
    ``CLOUDSDK_CONFIG`` are fresh directories under ``tmp_path`` (created here; use a fresh ``tmp_path`` per
    test so gcloud's on-disk GCE-detection cache never leaks between tests).
    """
    _check_loopback_addr(metadata_addr)
    home = Path(tempfile.mkdtemp(prefix="home-", dir=tmp_path))
    cloudsdk = Path(tempfile.mkdtemp(prefix="cloudsdk-", dir=tmp_path))
    env = {name: os.environ[name] for name in _PASSTHROUGH_ENV_VARS if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(
        {
            "GCE_METADATA_HOST": metadata_addr,
            "GCE_METADATA_IP": metadata_addr,
            "GCE_METADATA_ROOT": metadata_addr,
            "HOME": str(home),
            "CLOUDSDK_CONFIG": str(cloudsdk),
            "TMPDIR": str(tmp_path),
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
            # gcloud: no prompts, no update checks, no usage reporting (no traffic off the machine).
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
            "CLOUDSDK_CORE_SHOW_STRUCTURED_LOGS": "never",
        }
    )
    _check_env(env)
    return env


# --------------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------------


def node_available() -> bool:
    """``node`` is on PATH and ``npm ci`` has been run in ``tests/clients/node``."""
    modules = NODE_DIR / "node_modules"
    return (
        shutil.which("node") is not None
        and (modules / "gcp-metadata" / "package.json").is_file()
        and (modules / "google-auth-library" / "package.json").is_file()
    )


def go_available(flavour: str = "debian") -> bool:
    """``go`` is on PATH (or at /usr/local/go) and, for ``debian``, the Debian Go library packages are
    installed under /usr/share/gocode; ``current`` builds from the module cache / proxy."""
    if _go() is None:
        return False
    if flavour == "current":
        return True
    src = GOPATH / "src"
    return (src / "cloud.google.com" / "go" / "compute" / "metadata").is_dir() and (
        src / "golang.org" / "x" / "oauth2" / "google").is_dir()


def _go() -> str | None:
    """The machine's Go (/usr/local/go) first, as build.sh does."""
    return shutil.which("go", path=f"/usr/local/go/bin:{os.environ.get('PATH', os.defpath)}")


def gcloud_available() -> bool:
    """The gcloud CLI is on PATH (it cannot be installed from the reachable registries)."""
    return shutil.which("gcloud") is not None


# --------------------------------------------------------------------------------------------------------
# Running clients
# --------------------------------------------------------------------------------------------------------


def _run(
    argv: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:

        def text(data: str | bytes | None) -> str:
            return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")

        raise AssertionError(
            f"{argv[0]} timed out after {timeout} s\nstdout:\n{text(exc.stdout)}\nstderr:\n{text(exc.stderr)}"
        ) from exc


def _parse_json_result(name: str, proc: subprocess.CompletedProcess[str], check: bool) -> dict[str, Any]:
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result: Any = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    if not isinstance(result, dict):
        raise AssertionError(
            f"{name} client printed no JSON object (exit {proc.returncode})\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    if check and (proc.returncode != 0 or "error" in result):
        raise AssertionError(
            f"{name} client failed at stage {result.get('stage')!r}: {result.get('error')} "
            f"(exit {proc.returncode})\nstderr:\n{proc.stderr}"
        )
    return result


def run_node_client(
    env: dict[str, str], audience: str, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True
) -> dict[str, Any]:
    """Run ``client.js AUDIENCE``; return its JSON object.

    Keys: ``available``, ``project``, ``email``, ``access_token``, ``auth_header`` (``"Bearer …"``),
    ``id_token``, ``auth_project`` and ``universe_domain`` (``getUniverseDomainFromMetadataServer``, the
    last call). With ``check=False`` an ``{"error", "stage"}`` object is returned instead
    of raising. ``PATH`` is replaced by a private directory holding only ``node``, so google-auth-library's
    ``gcloud config config-helper`` project lookup cannot run (clients.md §5.3) and the request log stays
    deterministic.
    """
    _check_env(env)
    node = shutil.which("node")
    assert node is not None, "node is not on PATH"
    assert node_available(), "Node client not installed: run scripts/install-clients.sh"
    with tempfile.TemporaryDirectory(prefix="node-bin-") as bindir:
        os.symlink(os.path.realpath(node), Path(bindir) / "node")
        node_env = {**env, "PATH": bindir}
        argv = [str(Path(bindir) / "node"), str(NODE_DIR / "client.js"), audience]
        proc = _run(argv, node_env, timeout, NODE_DIR)
    return _parse_json_result("node", proc, check)


def build_go_client(out_dir: Path, *, flavour: str = "debian", timeout: float = 300.0) -> Path:
    """Build the Go client with ``tests/clients/go/build.sh FLAVOUR`` into ``out_dir``; return the binary.

    ``debian``: GOPATH mode against Debian's packages (falls back to ``-tags noidtoken``, ``id_token``
    then ``null``, when ``google.golang.org/api/idtoken`` does not build). ``current``: module mode
    against go.mod + go.sum, from the user's module cache. Both keep a build cache in
    ``~/.cache/metaemu/go-client``, so a second build is fast and needs no network. Built once per
    process and flavour: later calls return the first binary while it still exists.
    """
    with _go_lock:
        cached = _go_binaries.get(flavour)
        if cached is not None and cached.is_file():
            return cached
        assert go_available(flavour), f"Go client ({flavour}) not installed: run scripts/install-clients.sh"
        out_dir.mkdir(parents=True, exist_ok=True)
        binary = out_dir / f"metaemu-go-client-{flavour}"
        env = {name: os.environ[name] for name in _PASSTHROUGH_ENV_VARS if name in os.environ}
        home = Path.home()
        env.update({name: os.environ[name] for name in ("GOPROXY", "GOMODCACHE", "GOPATH") if name in os.environ})
        env.update({"HOME": str(home), "TMPDIR": str(out_dir),
                    "GOCACHE": str(home / ".cache" / "metaemu" / "go-client")})
        proc = _run(["bash", str(GO_DIR / "build.sh"), flavour, str(binary)], env, timeout)
        if proc.returncode != 0 or not binary.is_file():
            raise AssertionError(
                f"Go client build ({flavour}) failed (exit {proc.returncode})\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        _go_binaries[flavour] = binary
        return binary


def run_go_client(
    binary: Path, env: dict[str, str], audience: str, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True
) -> dict[str, Any]:
    """Run the Go client binary; return its JSON object.

    Keys: ``available`` (``OnGCE``), ``project``, ``numeric_project``, ``email``, ``scopes``,
    ``access_token``, ``token_type``, ``expiry_unix``, ``auth_header`` (``ComputeTokenSource``),
    ``auth_project`` / ``adc_access_token`` (``FindDefaultCredentials``), ``metadata_id_token``
    (``metadata.Get(".../identity?audience=…&format=full")``), ``id_token`` / ``id_token_expiry_unix``
    (``idtoken.NewTokenSource``; ``null`` when built without it) and ``idtoken_lib``.
    """
    _check_env(env)
    proc = _run([str(binary), audience], env, timeout)
    return _parse_json_result("go", proc, check)


def run_gcloud(
    env: dict[str, str], *args: str, timeout: float = DEFAULT_TIMEOUT, check: bool = True
) -> str | None:
    """Run ``gcloud ARGS…`` with the isolated env; return its stdout, or ``None`` when gcloud is absent.

    gcloud finds the metadata server only through ``GCE_METADATA_ROOT`` (clients.md §8.1) and caches its GCE
    detection in ``$CLOUDSDK_CONFIG/gce`` for 10 minutes, so give each test its own :func:`client_env`.
    With ``check=False`` a non-zero exit returns stdout instead of raising.
    """
    _check_env(env)
    gcloud = shutil.which("gcloud", path=env.get("PATH"))
    if gcloud is None:
        return None
    proc = _run([gcloud, *args], env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"gcloud {' '.join(args)} failed (exit {proc.returncode})\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc.stdout


# --------------------------------------------------------------------------------------------------------
# Small helpers for assertions
# --------------------------------------------------------------------------------------------------------


def jwt_claims(token: str) -> dict[str, Any]:
    """Decode a JWT's payload without verifying it (as the clients themselves do)."""
    parts = token.strip().split(".")
    assert len(parts) == 3, f"not a 3-part JWT: {token[:40]!r}"
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    claims = json.loads(base64.urlsafe_b64decode(payload))
    assert isinstance(claims, dict), "JWT payload is not a JSON object"
    return claims
