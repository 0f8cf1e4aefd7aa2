"""``metaemu credential-provider`` driven exactly as kubelet drives an exec plugin: a fresh process,
a CredentialProviderRequest on stdin, configuration in argv and the environment, the response read
from stdout, against the Google stand-in on loopback (issue #3, "credential-provider").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaemu.credentials.tokens import AccessToken
from metaemu.image_credentials import (
    API_VERSION,
    CACHE_MARGIN_S,
    DEFAULT_REGISTRIES,
    EXIT_FAILED,
    EXIT_USAGE,
    KUBELET_EXEC_TIMEOUT_S,
    CredentialProviderRequest,
    ProviderSettings,
    go_duration,
    main,
    parse_settings,
    provide,
    response_document,
)
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.world import AUDIENCE, KSA, NAMESPACE, PROJECT_ID, SERVICE_ACCOUNT, World, build_world
from tests.credentials.support import serve

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "us-docker.pkg.dev/demo-project/images/app:1.0"


@dataclass(frozen=True, slots=True)
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def response(self) -> dict[str, Any]:
        document = json.loads(self.stdout)
        assert isinstance(document, dict)
        return document


@pytest.fixture
async def google_url(world: World) -> AsyncIterator[str]:
    async with serve(world.google.app()) as base:
        yield base


@pytest.fixture
def env(google_url: str) -> dict[str, str]:
    """What kubelet passes: its own environment plus the provider's ``env`` entries."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "GCP_AUDIENCE": AUDIENCE,
            "METAEMU_STS_URL": f"{google_url}/v1/token", "METAEMU_IAM_CREDENTIALS_URL": f"{google_url}/v1"}


def request(*, token: str | None = None, annotations: Mapping[str, str] | None = None,
            image: str = IMAGE) -> str:
    """A CredentialProviderRequest as kubelet encodes it (empty fields omitted)."""
    doc: dict[str, Any] = {"kind": "CredentialProviderRequest", "apiVersion": API_VERSION, "image": image}
    if token is not None:
        doc["serviceAccountToken"] = token
    if annotations:
        doc["serviceAccountAnnotations"] = dict(annotations)
    return json.dumps(doc)


async def run(stdin: str, env: Mapping[str, str], *args: str) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "metaemu.image_credentials", *args, env=dict(env), cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=KUBELET_EXEC_TIMEOUT_S)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def duration_s(text: str) -> int:
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+)s", text)
    assert match, text
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


# ---------------------------------------------------------------- success


async def test_exchanges_the_pods_token_and_answers_for_the_google_registries(
        world: World, env: dict[str, str]) -> None:
    result = await run(request(token=world.write_token()), env)
    assert (result.code, result.stderr) == (0, "")
    response = result.response
    assert set(response) == {"apiVersion", "kind", "cacheKeyType", "cacheDuration", "auth"}  # kubelet decodes strictly
    assert (response["apiVersion"], response["kind"], response["cacheKeyType"]) == (
        API_VERSION, "CredentialProviderResponse", "Registry")
    assert list(response["auth"]) == list(DEFAULT_REGISTRIES)
    (auth,) = {json.dumps(a, sort_keys=True) for a in response["auth"].values()}  # one credential for all
    credential = json.loads(auth)
    assert set(credential) == {"username", "password"} and credential["username"] == "oauth2accesstoken"
    info = world.google.token_info(credential["password"])
    assert info is not None and info.kind == "federated" and info.principal == world.principal
    # STS says 3599 s; kubelet may cache it until five minutes before expiry.
    assert 3599 - CACHE_MARGIN_S - 10 <= duration_s(response["cacheDuration"]) <= 3599 - CACHE_MARGIN_S
    (sts,) = [r for r in world.google.requests if r.endpoint == "sts"]
    assert sts.form["audience"] == AUDIENCE and sts.form["scope"] == "https://www.googleapis.com/auth/cloud-platform"


async def test_impersonates_the_service_account_the_pods_annotation_names(world: World, env: dict[str, str]) -> None:
    other = f"other@{PROJECT_ID}.iam.gserviceaccount.com"  # the node-wide default, not granted: unused
    world.google.add_service_account(other)
    result = await run(request(token=world.write_token(),
                               annotations={"iam.gke.io/gcp-service-account": SERVICE_ACCOUNT}),
                       env, f"--service-account={other}")
    assert result.code == 0, result.stderr
    password = result.response["auth"]["*.pkg.dev"]["password"]
    info = world.google.token_info(password)
    assert info is not None and (info.kind, info.email) == ("service_account", SERVICE_ACCOUNT)
    (sts,) = [r for r in world.google.requests if r.endpoint == "sts"]
    assert sts.form["scope"] == "https://www.googleapis.com/auth/iam"  # UP-02: iam scope before impersonation
    assert [r.account for r in world.google.requests if r.endpoint == "generateAccessToken"] == [SERVICE_ACCOUNT]


async def test_impersonates_the_configured_service_account_without_an_annotation(
        world: World, env: dict[str, str]) -> None:
    result = await run(request(token=world.write_token()), env, "--service-account", SERVICE_ACCOUNT)
    assert result.code == 0, result.stderr
    info = world.google.token_info(result.response["auth"]["gcr.io"]["password"])
    assert info is not None and info.email == SERVICE_ACCOUNT


async def test_uses_the_token_file_when_kubelet_sends_no_token(world: World, env: dict[str, str]) -> None:
    world.write_token()
    result = await run(request(), env, "--token-file", str(world.token_file), "--registry", "europe-docker.pkg.dev",
                       "--registry", "registry.example:5000/team")
    assert result.code == 0, result.stderr
    assert list(result.response["auth"]) == ["europe-docker.pkg.dev", "registry.example:5000/team"]


async def test_the_audience_flag_overrides_the_environment(world: World, env: dict[str, str]) -> None:
    env["GCP_AUDIENCE"] = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/x/providers/y"
    result = await run(request(token=world.write_token()), env, f"--audience={AUDIENCE}")
    assert result.code == 0, result.stderr


# ---------------------------------------------------------------- bad input: stderr, exit 2, empty stdout


@pytest.mark.parametrize(("stdin", "args", "words"), [
    ("not json", (), "stdin: not JSON"),
    ("[]", (), "expected a JSON object"),
    (request(token="t").replace(API_VERSION, "credentialprovider.kubelet.k8s.io/v1alpha1"), (),
     "apiVersion: expected 'credentialprovider.kubelet.k8s.io/v1'"),
    (request(token="t").replace('"CredentialProviderRequest"', '"CredentialProviderResponse"'), (),
     "kind: expected 'CredentialProviderRequest'"),
    (request(token="t", image=" "), (), "image: required"),
    (json.dumps({"apiVersion": API_VERSION, "kind": "CredentialProviderRequest", "image": IMAGE,
                 "serviceAccountAnnotations": {"a": 1}}), (), "serviceAccountAnnotations: must map strings"),
    (request(), (), "kubelet sent no service-account token and no --token-file"),
    (request(token="t", annotations={"iam.gke.io/gcp-service-account": "not-an-email"}), (),
     "'not-an-email' is not a service-account email"),
    (request(token="t"), ("--audience", "https://iam.googleapis.com/projects/1"), "--audience: expected //"),
    (request(token="t"), ("--bogus",), "unrecognized arguments: --bogus"),
])
async def test_bad_input_is_refused_on_stderr_with_nothing_on_stdout(
        env: dict[str, str], stdin: str, args: tuple[str, ...], words: str) -> None:
    result = await run(stdin, env, *args)
    assert (result.code, result.stdout) == (EXIT_USAGE, "")
    assert result.stderr.startswith("metaemu credential-provider: invalid input: ") and words in result.stderr


async def test_a_missing_audience_names_both_ways_to_set_it(env: dict[str, str]) -> None:
    del env["GCP_AUDIENCE"]
    result = await run(request(token="t"), env)
    assert (result.code, result.stdout) == (EXIT_USAGE, "")
    assert "--audience: required (or set GCP_AUDIENCE)" in result.stderr


# ---------------------------------------------------------------- upstream refusals: stderr, exit 1


async def test_an_sts_denial_fails_with_googles_reason(world: World, env: dict[str, str]) -> None:
    token = world.issuer.mint_kubernetes(namespace=NAMESPACE, service_account=KSA,
                                         audience="https://registry.example")  # not the provider's audience
    result = await run(request(token=token), env)
    assert (result.code, result.stdout) == (EXIT_FAILED, "")
    assert f"no registry credentials for {IMAGE}: sts returned 400: invalid_grant" in result.stderr
    assert token not in result.stderr


async def test_an_iam_denial_fails_with_googles_reason(world: World, env: dict[str, str]) -> None:
    stranger = f"stranger@{PROJECT_ID}.iam.gserviceaccount.com"
    world.google.add_service_account(stranger)  # exists, but the workload holds no grant on it
    result = await run(request(token=world.write_token(), annotations={"iam.gke.io/gcp-service-account": stranger}),
                       env)
    assert (result.code, result.stdout) == (EXIT_FAILED, "")
    assert "iam returned 403: Permission 'iam.serviceAccounts.getAccessToken' denied" in result.stderr


async def test_an_unreachable_sts_fails_without_output(world: World, env: dict[str, str], refused_port: int) -> None:
    env["METAEMU_STS_URL"] = f"http://127.0.0.1:{refused_port}/v1/token"
    result = await run(request(token=world.write_token()), env)
    assert (result.code, result.stdout) == (EXIT_FAILED, "")
    assert "sts unreachable" in result.stderr


async def test_an_expired_token_file_fails_before_any_exchange(world: World, env: dict[str, str]) -> None:
    world.token_file.write_text(world.issuer.mint_kubernetes(namespace=NAMESPACE, service_account=KSA,
                                                             audience=AUDIENCE, lifetime_s=-60))
    result = await run(request(), env, "--token-file", str(world.token_file))
    assert (result.code, result.stdout) == (EXIT_FAILED, "")
    assert "expired" in result.stderr and world.google.calls["sts"] == 0


# ---------------------------------------------------------------- pieces, in process


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59, "59s"), (60, "1m0s"), (3300, "55m0s"),
                                                (3299, "54m59s"), (3600, "1h0m0s"), (43200, "12h0m0s")])
def test_cache_durations_are_written_as_go_does(seconds: int, text: str) -> None:
    assert go_duration(seconds) == text


def test_a_token_too_close_to_expiry_is_not_cached() -> None:
    token = AccessToken(value="ya29.x", expiry=dt.datetime.fromtimestamp(1000 + CACHE_MARGIN_S - 1, tz=dt.UTC))
    assert response_document(token, registries=["gcr.io"], now_ts=1000)["cacheDuration"] == "0s"


@pytest.mark.parametrize(("service_account", "expected"), [(None, "54m59s"), (SERVICE_ACCOUNT, "55m0s")])
async def test_cache_duration_is_the_remaining_life_less_the_margin(tmp_path: Path, service_account: str | None,
                                                                    expected: str) -> None:
    clock = FakeClock()  # virtual time: STS says 3599 s, IAM expires in 3600 s, both from "now"
    world = build_world(tmp_path, clock=clock)
    request = CredentialProviderRequest(image=IMAGE, service_account_token=world.write_token())
    response = await provide(request, ProviderSettings(audience=AUDIENCE, service_account=service_account),
                             http=world.google.client(), clock=clock)
    assert response["cacheDuration"] == expected


def test_main_is_callable_in_process_with_its_own_streams() -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = main(["--audience", AUDIENCE], stdin=io.StringIO("{"), stdout=stdout, stderr=stderr, environ={})
    assert (code, stdout.getvalue()) == (EXIT_USAGE, "") and "not JSON" in stderr.getvalue()


# ---------------------------------------------------------------- shipped manifests


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_kubelet_config_is_a_v1_credential_provider_config_metaemu_accepts() -> None:
    (config,) = load_all(ROOT / "manifests/credential-provider/credential-provider-config.yaml")
    assert (config["apiVersion"], config["kind"]) == ("kubelet.config.k8s.io/v1", "CredentialProviderConfig")
    (provider,) = config["providers"]
    assert set(provider) <= {"name", "matchImages", "defaultCacheDuration", "apiVersion", "args", "env",
                             "tokenAttributes"}
    assert provider["name"] == "metaemu" and provider["apiVersion"] == API_VERSION
    assert provider["args"][0] == "credential-provider"
    settings = parse_settings(provider["args"][1:], {})
    assert set(provider["matchImages"]) == set(DEFAULT_REGISTRIES) == set(settings.registries)
    attributes = provider["tokenAttributes"]
    assert set(attributes) <= {"serviceAccountTokenAudience", "cacheType", "requireServiceAccount",
                               "requiredServiceAccountAnnotationKeys", "optionalServiceAccountAnnotationKeys"}
    assert attributes["cacheType"] in ("Token", "ServiceAccount") and attributes["requireServiceAccount"] is True
    assert "iam.gke.io/gcp-service-account" in attributes["optionalServiceAccountAnnotationKeys"]
    # The token kubelet requests is for the provider's default allowed audience (https: + full name).
    assert attributes["serviceAccountTokenAudience"] == "https:" + settings.audience


def test_the_rbac_lets_nodes_request_exactly_that_audience() -> None:
    (config,) = load_all(ROOT / "manifests/credential-provider/credential-provider-config.yaml")
    audience = config["providers"][0]["tokenAttributes"]["serviceAccountTokenAudience"]
    role, binding = load_all(ROOT / "manifests/credential-provider/rbac.yaml")
    assert (role["kind"], binding["kind"]) == ("ClusterRole", "ClusterRoleBinding")
    assert role["apiVersion"] == binding["apiVersion"] == "rbac.authorization.k8s.io/v1"
    (rule,) = role["rules"]
    assert rule == {"apiGroups": [""], "resources": [audience], "verbs": ["request-serviceaccounts-token-audience"]}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}]


@pytest.mark.parametrize("version", ["1.33.0", "latest"])
def test_the_rbac_validates_strictly_against_the_kubernetes_schema(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    target = kubernetes_validate.latest_version() if version == "latest" else version
    for resource in load_all(ROOT / "manifests/credential-provider/rbac.yaml"):
        kubernetes_validate.validate(resource, target, strict=True)
