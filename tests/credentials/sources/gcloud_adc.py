"""ADC files as gcloud writes them, for the ``google`` source tests (issue #14).

``gcloud_528/`` holds what gcloud 528.0.0 wrote, offline, against the OAuth and STS stand-ins of
``metaemu.testing`` (``write_with_gcloud`` below is the recipe): ``gcloud auth application-default
login --no-launch-browser`` with ``CLOUDSDK_AUTH_TOKEN_HOST`` pointing at ``FakeOAuthUser`` (or
``--login-config`` naming ``FakeWorkforceSts``) and the authorization code on stdin. gcloud cannot
write an impersonated file with a service-account key inside (its ADC login is always a user's), so
that one follows google-auth's ``impersonated_credentials.from_impersonated_service_account_info``.

The files keep what gcloud put in them, including the public OAuth clients gcloud uses for ADC
and for workforce logins (``client_id``, ``client_secret``); tests swap in a refresh token and, for
workforce files, the stand-in's URL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

GCLOUD_DIR = Path(__file__).with_name("gcloud_528")
WORKFORCE_AUDIENCE = "//iam.googleapis.com/locations/global/workforcePools/my-pool/providers/my-provider"


def gcloud_written(name: str) -> dict[str, Any]:
    """``gcloud_528/NAME.json``, parsed."""
    info: dict[str, Any] = json.loads((GCLOUD_DIR / f"{name}.json").read_text())
    return info


def adc_client() -> tuple[str, str]:
    """The OAuth client of ``gcloud auth application-default login`` (id, secret), as it wrote them."""
    source = gcloud_written("impersonated_service_account")["source_credentials"]
    return source["client_id"], source["client_secret"]


def workforce_client() -> tuple[str, str]:
    """The OAuth client gcloud uses for workforce logins (id, secret), as it wrote them."""
    info = gcloud_written("external_account_authorized_user")
    return info["client_id"], info["client_secret"]


def with_workforce_endpoint(info: dict[str, Any], *, base_url: str, refresh_token: str) -> dict[str, Any]:
    """A workforce file (or one nested in an impersonated file) aimed at the stand-in."""
    inner = info["source_credentials"] if info["type"] == "impersonated_service_account" else info
    inner.update(refresh_token=refresh_token, token_url=f"{base_url}/v1/oauthtoken",
                 token_info_url=f"{base_url}/v1/introspect")
    return info


def gcloud_path() -> str | None:
    return shutil.which("gcloud")


def write_with_gcloud(config_dir: Path, *, code: str, token_host: str, args: list[str],
                      metadata_root: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Run ``gcloud auth application-default login --no-launch-browser ARGS`` in a fresh
    ``CLOUDSDK_CONFIG``, pasting ``code`` as the browser would; return the file it wrote.

    ``token_host`` is the user-login token endpoint; ``metadata_root`` a refused loopback address,
    so gcloud's GCE check cannot leave the machine. ``OAUTHLIB_INSECURE_TRANSPORT`` lets oauthlib
    post the code to a plain-http stand-in."""
    gcloud = gcloud_path()
    assert gcloud is not None
    home = config_dir / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home), "CLOUDSDK_CONFIG": str(config_dir),
           "CLOUDSDK_AUTH_TOKEN_HOST": token_host, "OAUTHLIB_INSECURE_TRANSPORT": "1",
           "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false", "GCE_METADATA_ROOT": metadata_root,
           "GCE_METADATA_HOST": metadata_root, "GCE_METADATA_IP": metadata_root,
           "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true", "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
           "NO_PROXY": "*", "TMPDIR": str(config_dir)}
    proc = subprocess.run([gcloud, "auth", "application-default", "login", "--no-launch-browser", *args],
                          input=code + "\n", env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    written = config_dir / "application_default_credentials.json"
    assert proc.returncode == 0 and written.is_file(), (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    info: dict[str, Any] = json.loads(written.read_text())
    return info
