"""The exact bytes the webhook patches into a sample pod in each variant, with manifests/webhook's
shipped configuration (issue #14: the issue note lists them byte for byte). A change to what is
injected fails here until tests/webhook/injects/ is regenerated (``METAEMU_REGENERATE=1``) and
the note updated with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from metaemu.webhook.injection import Injected, decide
from metaemu.webhook.jsonpatch import encode
from metaemu.webhook.pod_shape import parse_pod
from metaemu.webhook.settings import parse_settings
from tests.webhook.samples import GOOGLE_ACCOUNT, namespace, sample_pod

ROOT = Path(__file__).resolve().parents[2]
INJECTS = Path(__file__).with_name("injects")


def shipped_patch(variant: str) -> bytes:
    configmap = yaml.safe_load((ROOT / "manifests/webhook/base/configmap.yaml").read_text())
    settings = parse_settings(yaml.safe_load(configmap["data"]["webhook.yaml"]), base_dir=Path("/"))
    decision = decide(parse_pod(sample_pod()), namespace(annotations={"metaemu.dev/variant": variant}),
                      google_account=GOOGLE_ACCOUNT, settings=settings.sidecar, own_namespace=settings.namespace)
    assert isinstance(decision, Injected)
    return encode(decision.operations)


@pytest.mark.parametrize("variant", ["loopback", "environment"])
def test_the_sample_pods_patch_is_exactly_the_recorded_one(variant: str) -> None:
    recorded = INJECTS / f"{variant}.json"
    if os.environ.get("METAEMU_REGENERATE") == "1":
        recorded.write_bytes(shipped_patch(variant))
    assert shipped_patch(variant) == recorded.read_bytes()
