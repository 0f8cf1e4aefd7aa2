"""node.passthrough end to end on the simulated node (issue #11, "Sharing 169.254.169.254 with the
cloud's own metadata service"): the IMDSv2 stand-in (metaemu.testing.imds_stand_in, hop limit 1 as
EC2's default) in the cloud namespace at the real metadata address 169.254.169.254:80, the real
interception rules in the node namespace, the agent against the real kube-apiserver of the test bed
(tests/kube/test_simulated_node.py) with ``node.passthrough: [aws]`` and its relay left at the
default address, and, in pod namespaces, real botocore and real google-auth calling plain
http://169.254.169.254. Proves: botocore's region discovery, IMDSv2 session token and instance
identity document work through the agent, and it finds no instance role (security.md §3 item 3);
google-auth still gets metaemu's token for the pod's own Google account; IMDS never sees a
Google-bound request, a pod's address or X-Forwarded-For, and the agent's own connection to IMDS is
not intercepted (no loop); the relay reaches IMDS as the node does, so the hop limit 1 that keeps a
pod's direct IMDSv2 token off it does not keep it off the relay (the README says so); and without
``node.passthrough`` AWS requests are refused by metaemu as before and never reach IMDS.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube.cluster import KubeCluster
from tests.kube.test_simulated_node import GSA, Sim, control, simulated_node, wait_until
from tests.node.netns import METADATA_IP, UPLINK_CLOUD_IP, UPLINK_NODE_IP, SimulatedNode

pytestmark = [pytest.mark.kube, pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(c) for c in ("ip", "iptables", "conntrack")),
    reason="needs root, iproute2, iptables and conntrack to build a simulated node")]

IMDS = f"{METADATA_IP}:80"
#: The stand-in's second address, on the cloud side of the uplink and never intercepted: what a pod
#: reaches there it reaches directly, through the node's routing (one hop more than the node).
IMDS_DIRECT = f"{UPLINK_CLOUD_IP}:80"
HOP_LIMIT = 1
#: Bounds each SDK call (botocore's metadata_service_timeout, google-auth's): an answer takes
#: milliseconds here; only the hop-limit test waits one out, for an answer that never comes.
CLIENT_TIMEOUT_S = 2

#: botocore as an SDK configures itself from the environment (AWS_EC2_METADATA_SERVICE_ENDPOINT,
#: IMDSv1 disabled so every GET must carry an IMDSv2 token): the session's IMDS region provider,
#: then IMDSv2 token + instance identity document, then the instance-profile credential lookup.
BOTOCORE = """
import json, botocore.session
from botocore.utils import IMDSFetcher, IMDSRegionProvider, InstanceMetadataFetcher
session = botocore.session.get_session()
config = {"ec2_metadata_service_endpoint": session.get_config_variable("ec2_metadata_service_endpoint"),
          "ec2_metadata_v1_disabled": session.get_config_variable("ec2_metadata_v1_disabled")}
timeout = session.get_config_variable("metadata_service_timeout")
out = {"endpoint": config["ec2_metadata_service_endpoint"]}
try:
    out["region"] = IMDSRegionProvider(session).provide()
    fetcher = IMDSFetcher(timeout=timeout, num_attempts=1, config=config)
    token = fetcher._fetch_metadata_token()
    out["token"] = bool(token)
    out["document"] = json.loads(fetcher._get_request("latest/dynamic/instance-identity/document", None, token).text)
    roles = InstanceMetadataFetcher(timeout=timeout, num_attempts=1, config=config)
    out["role"] = roles.retrieve_iam_role_credentials()
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""

#: google-auth's Compute Engine credentials, pointed at the metadata address by its own variables.
GOOGLE = """
import json, google.auth.transport.requests as r
from google.auth import compute_engine
from google.auth.compute_engine import _metadata
try:
    request = r.Request()
    creds = compute_engine.Credentials()
    creds.refresh(request)
    print(json.dumps({"ping": _metadata.ping(request), "token": creds.token, "email": creds.service_account_email}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""

#: One raw IMDS request with http.client (no SDK logic): (status, body) or an error word.
RAW = """
import http.client, json, socket, sys
host, port, method, path, headers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
try:
    c = http.client.HTTPConnection(host, port, timeout=float(sys.argv[6]))
    c.request(method, path, headers=headers)
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": r.read().decode(errors="replace"),
                      "flavor": r.getheader("Metadata-Flavor")}))
except (TimeoutError, socket.timeout):
    print(json.dumps({"error": "timeout"}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__}))
"""


class Imds:
    """The stand-in's request log (metaemu.testing.imds_stand_in): every request it received."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


def start_imds(node: SimulatedNode, log: Path) -> None:
    """The IMDSv2 stand-in in the cloud namespace, on the metadata address and the uplink's."""
    process = node.popen_in(node.cloud_ns, sys.executable, "-m", "metaemu.testing.imds_stand_in", "--listen", IMDS,
                            "--listen", IMDS_DIRECT, "--log", str(log), "--hop-limit", str(HOP_LIMIT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "READY", process.stderr.read() if process.stderr else ""


@contextlib.contextmanager
def node_with_imds(cluster: KubeCluster, tmp_path: Path, *agent_args: str) -> Iterator[tuple[Sim, Imds]]:
    log = tmp_path / "imds.jsonl"
    with simulated_node(cluster, tmp_path, *agent_args, cloud=lambda node: start_imds(node, log)) as sim:
        yield sim, Imds(log)


@pytest.fixture
def passthrough(cluster: KubeCluster, tmp_path: Path) -> Iterator[tuple[Sim, Imds]]:
    # node.passthrough_address left at its default, 169.254.169.254:80: the real address.
    with node_with_imds(cluster, tmp_path, "--passthrough", "aws") as pair:
        yield pair


@pytest.fixture
def no_passthrough(cluster: KubeCluster, tmp_path: Path) -> Iterator[tuple[Sim, Imds]]:
    with node_with_imds(cluster, tmp_path) as pair:
        yield pair


def in_pod(node: SimulatedNode, ns: str, script: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """``script`` run by this venv's Python in namespace ``ns`` with a clean environment; its JSON."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    out = subprocess.run([*node.exec_prefix(ns), sys.executable, "-c", script, *args], env={**base, **(env or {})},
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout, out.stderr
    return json.loads(out.stdout)


AWS_ENV = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{METADATA_IP}/", "AWS_EC2_METADATA_V1_DISABLED": "true",
           "AWS_METADATA_SERVICE_TIMEOUT": str(CLIENT_TIMEOUT_S), "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "1"}
GOOGLE_ENV = {"GCE_METADATA_HOST": METADATA_IP, "GCE_METADATA_IP": METADATA_IP, "GCE_METADATA_ROOT": METADATA_IP,
              "GCE_METADATA_TIMEOUT": str(CLIENT_TIMEOUT_S)}


def raw(node: SimulatedNode, ns: str, address: str, method: str, path: str,
        headers: dict[str, str] | None = None) -> dict[str, Any]:
    host, port = address.split(":")
    result: dict[str, Any] = in_pod(node, ns, RAW, host, port, method, path, json.dumps(headers or {}),
                                    str(CLIENT_TIMEOUT_S))
    return result


def relayed_count(node: SimulatedNode, code: int) -> float:
    """metaemu_requests_total for the relay's route and ``code``, from the agent's /metrics."""
    text = node.run_in(node.node_ns, sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
                       "'http://127.0.0.1:8081/metrics', timeout=5).read().decode())").stdout
    for line in text.splitlines():
        if (line.startswith("metaemu_requests_total{") and 'route="(passthrough aws)"' in line
                and f'code="{code}"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_nothing_google_bound(imds: Imds) -> None:
    for entry in imds.requests():
        names = {name.lower() for name, _ in entry["headers"]}
        assert "metadata-flavor" not in names and "x-google-metadata-request" not in names, entry
        assert "computemetadata" not in entry["path"].lower(), entry
        assert not names & {"x-forwarded-for", "forwarded", "via"}, entry


def test_botocore_region_imdsv2_token_and_identity_document_work_through_the_agent(
        passthrough: tuple[Sim, Imds]) -> None:
    sim, imds = passthrough
    node = sim.node
    out = in_pod(node, node.pod_ns(1), BOTOCORE, env=AWS_ENV)
    assert "error" not in out, out
    assert out["endpoint"] == f"http://{METADATA_IP}/"
    assert out["region"] == "eu-west-3" and out["token"] is True
    assert out["document"]["region"] == "eu-west-3" and out["document"]["instanceId"] == "i-fake"
    assert out["role"] == {}  # the node's instance role is never relayed (security.md §3 item 3)
    seen = imds.requests()
    # IMDSv2 all the way (IMDSv1 is disabled in the SDK, and the stand-in answers 401 without a
    # token); the role lookup stopped at metaemu's 404, before IMDS.
    assert [(r["method"], r["path"]) for r in seen] == [
        ("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/placement/availability-zone/"),
        ("PUT", "/latest/api/token"), ("GET", "/latest/dynamic/instance-identity/document"),
        ("PUT", "/latest/api/token")]
    # The relay is the node's own connection: not intercepted (no loop back into metaemu), from the
    # node's uplink address, never the pod's; the pod's Host and the SDK's TTL header crossed as sent.
    assert {r["peer"] for r in seen} == {UPLINK_NODE_IP}
    fields = [{name.lower(): value for name, value in r["headers"]} for r in seen]
    assert all(f["host"] == METADATA_IP for f in fields)
    assert all(int(f["x-aws-ec2-metadata-token-ttl-seconds"]) > 0 for f, r in zip(fields, seen, strict=True)
               if r["method"] == "PUT")
    assert all("x-aws-ec2-metadata-token" in f for f, r in zip(fields, seen, strict=True) if r["method"] == "GET")
    assert_nothing_google_bound(imds)
    wait_until(lambda: relayed_count(node, 200) == 5, "the agent's metrics to count five relayed answers")


def test_google_clients_still_get_metaemu_and_nothing_google_bound_is_relayed(passthrough: tuple[Sim, Imds]) -> None:
    sim, imds = passthrough
    node = sim.node
    out = in_pod(node, node.pod_ns(1), GOOGLE, env=GOOGLE_ENV)
    assert "error" not in out, out
    assert out["ping"] is True and out["email"] == GSA[1]
    assert control(node, "GET", f"/token-info?token={out['token']}")["email"] == GSA[1]  # metaemu's token
    # Google-bound shapes that an AWS path or method might tempt a relay with: metaemu answers each.
    token = raw(node, node.pod_ns(2), IMDS, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert token["status"] == 200
    for method, path, headers in [
            ("GET", "/latest/meta-data/placement/region", {"Metadata-Flavor": "Google",
                                                           "X-aws-ec2-metadata-token": token["body"]}),
            ("PUT", "/latest/api/token", {"Metadata-Flavor": "Google", "X-aws-ec2-metadata-token-ttl-seconds": "60"}),
            ("GET", "/latest/../computeMetadata/v1/project/project-id", {"Metadata-Flavor": "Google"}),
            ("GET", "/latest/meta-data/%63omputeMetadata/v1/", {"X-aws-ec2-metadata-token": token["body"]}),
            ("GET", "/computeMetadata/v1/project/project-id", {})]:
        answer = raw(node, node.pod_ns(2), IMDS, method, path, headers)
        assert answer.get("flavor") == "Google", (method, path, answer)  # metaemu's own answer
    assert [(r["method"], r["path"]) for r in imds.requests()] == [("PUT", "/latest/api/token")]
    assert_nothing_google_bound(imds)


def test_the_relay_reaches_imds_as_the_node_so_hop_limit_1_does_not_keep_pods_off_it(
        passthrough: tuple[Sim, Imds]) -> None:
    sim, imds = passthrough
    node = sim.node
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    # Directly (the stand-in's uplink address, routed by the node): the request arrives and a GET's
    # answer comes back, but the token's answer leaves with TTL 1 and dies at the node's router.
    assert raw(node, node.pod_ns(3), IMDS_DIRECT, "GET", "/latest/meta-data/placement/region")["status"] == 401
    assert raw(node, node.pod_ns(3), IMDS_DIRECT, "PUT", "/latest/api/token", ttl) == {"error": "timeout"}
    # Through the agent, the same pod gets a token: IMDS answered the node, one hop closer.
    token = raw(node, node.pod_ns(3), IMDS, "PUT", "/latest/api/token", ttl)
    assert token["status"] == 200 and token["flavor"] is None
    region = raw(node, node.pod_ns(3), IMDS, "GET", "/latest/meta-data/placement/region",
                 {"X-aws-ec2-metadata-token": token["body"]})
    assert (region["status"], region["body"]) == (200, "eu-west-3")
    peers = [(r["method"], r["peer"]) for r in imds.requests()]
    assert peers == [("GET", node.pod_ip(3)), ("PUT", node.pod_ip(3)), ("PUT", UPLINK_NODE_IP),
                     ("GET", UPLINK_NODE_IP)]


def test_without_passthrough_aws_requests_are_refused_by_metaemu_and_never_reach_imds(
        no_passthrough: tuple[Sim, Imds]) -> None:
    sim, imds = no_passthrough
    node = sim.node
    out = in_pod(node, node.pod_ns(1), BOTOCORE, env=AWS_ENV)
    assert out.get("region") is None, out  # botocore finds no IMDS region, as before #11
    token = raw(node, node.pod_ns(1), IMDS, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert (token["status"], token["flavor"]) == (405, "Google")
    region = raw(node, node.pod_ns(1), IMDS, "GET", "/latest/meta-data/placement/region")
    assert (region["status"], region["flavor"]) == (404, "Google")
    assert in_pod(node, node.pod_ns(1), GOOGLE, env=GOOGLE_ENV).get("email") == GSA[1]  # Google's side unchanged
    assert imds.requests() == []
