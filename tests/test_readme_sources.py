"""Every source configuration the README shows is one metaemu accepts (issue #3: "the README
sections exist and their configs are exercised by tests")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from metaemu.config import load_config, parse_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"<!-- source-config -->\n```yaml\n(.*?)```", README, flags=re.S)


def test_readme_has_a_configuration_for_every_source_kind() -> None:
    kinds = {(yaml.safe_load(b)["workload_identity"].get("source") or {}).get("type") for b in BLOCKS}
    assert kinds >= {"kubernetes", "aws", "oidc", "google", None}  # None: credential_config


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: re.sub(r"\W+", "-", b.split("type:")[-1][:20]).strip("-"))
def test_readme_source_configuration_parses(block: str, tmp_path: Path) -> None:
    raw = yaml.safe_load(block)
    if "credential_config" in raw["workload_identity"]:
        (tmp_path / "creds.json").write_text(json.dumps({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": "https://sts.googleapis.com/v1/token",
            "credential_source": {"file": "/var/run/secrets/tokens/gcp/token"}}))
        path = tmp_path / "metaemu.yaml"
        path.write_text(block)
        config = load_config(path=path, env={})
    else:
        config = parse_config(raw, hostname="node-1", base_dir=tmp_path)
    assert config.project_id == "my-project"
