"""The sidecar set-up, for real, in a network namespace this test creates (issue #5; SEC-16):
the init container's step (169.254.169.254/32 on the pod's loopback, unprivileged port 80),
metaemu running as uid 65532 bound to 169.254.169.254:80, and an unmodified google-auth client
with NO override variables that finds it the way it would on GCE (GCE_METADATA_* unset, H-01, H-02).

Needs root and iproute2; skipped otherwise. Nothing leaves the namespace: 169.254.169.254 exists
only on its loopback, and the Google stand-in is metaemu demo's embedded one on its 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("setpriv") is None,
                                reason="needs root, iproute2 and setpriv to create a network namespace")

NON_ROOT = ["setpriv", "--reuid=65532", "--regid=65532", "--clear-groups", "--"]
CLIENT = """
import json, google.auth, google.auth.transport.requests as r
creds, project = google.auth.default()
creds.refresh(r.Request())
print(json.dumps({"project": project, "email": creds.service_account_email, "token": creds.token,
                  "type": type(creds).__name__}))
"""


@pytest.fixture
def pod_netns() -> Iterator[str]:
    name = f"metaemu-sidecar-{os.getpid()}"
    hosts_dir = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # What the sidecar's init container does (manifests/sidecar): the metadata address on lo.
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"],
                    ["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=80"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        # What the pod's hostAliases do: `ip netns exec` bind-mounts this over /etc/hosts.
        hosts_dir.mkdir(parents=True)
        (hosts_dir / "hosts").write_text("127.0.0.1 localhost\n169.254.169.254 metadata.google.internal metadata\n")
        yield name
    finally:
        shutil.rmtree(hosts_dir, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def test_unmodified_client_without_overrides_gets_its_token(pod_netns: str, image_install: Path) -> None:
    # Server and client run as uid 65532 from the image-like install (tests/conftest.py), which that
    # uid can read wherever the checkout is; their HOME is a directory it can use.
    python = str(image_install / "venv/bin/python")
    home = Path(tempfile.mkdtemp(dir=image_install))
    home.chmod(0o777)
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": "/tmp"}
    server = subprocess.Popen(in_netns(pod_netns, *NON_ROOT, python, "-m", "metaemu", "demo",
                                       "--listen", "169.254.169.254:80", "--admin-listen", "127.0.0.1:8081"),
                              env=clean_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # a child process coming up: poll its readiness, bounded
            probe = subprocess.run(in_netns(pod_netns, sys.executable, "-c",
                                            "import urllib.request as u; u.urlopen('http://127.0.0.1:8081/readyz', "
                                            "timeout=1)"), capture_output=True, timeout=10)
            if probe.returncode == 0:
                break
            assert server.poll() is None, server.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "metaemu did not become ready in the namespace"
            time.sleep(0.1)
        assert not any(k.startswith("GCE_METADATA") for k in clean_env)
        client = subprocess.run(in_netns(pod_netns, *NON_ROOT, python, "-c", CLIENT), env=clean_env,
                                capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr[-2000:]
        out = json.loads(client.stdout)
        assert out["type"] == "Credentials"  # google.auth.compute_engine: it believes it is on GCE
        assert out["project"] == "demo-project"
        assert out["email"] == "demo-app@demo-project.iam.gserviceaccount.com"
        assert out["token"].startswith("ya29.sa-")
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0  # SIGTERM: clean exit
