"""Configuration loading: every bad input names its key (issue §5); derivations and overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaemu.config import load_config, parse_config
from metaemu.credentials.sources.config import FileSourceConfig, KubernetesSourceConfig
from metaemu.errors import ConfigError

AUD = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/pool/providers/prov"
SA = "app@my-project.iam.gserviceaccount.com"


def base() -> dict[str, Any]:
    return {
        "project_id": "my-project",
        "workload_identity": {
            "audience": AUD,
            "service_account": SA,
            "source": {"type": "kubernetes", "token_file": "/var/run/secrets/tokens/gcp/token"},
        },
    }


def parse(raw: dict[str, Any]) -> Any:
    return parse_config(raw, hostname="node-1", base_dir=Path("/"))


def test_minimal_config_gets_documented_defaults() -> None:
    c = parse(base())
    assert str(c.listen) == "127.0.0.1:8080"
    assert str(c.admin_listen) == "127.0.0.1:8081"
    assert c.profile == "gke"
    assert c.numeric_project_id == "123456789012"  # derived from the audience
    assert c.workload_identity.scopes == ("https://www.googleapis.com/auth/cloud-platform",)
    assert c.workload_identity.token_lifetime_seconds == 3600
    assert c.workload_identity.source == KubernetesSourceConfig(token_file=Path("/var/run/secrets/tokens/gcp/token"))
    assert c.email == SA
    assert c.instance.hostname == "node-1.c.my-project.internal"
    assert c.instance.id.isdigit() and len(c.instance.id) == 19
    assert parse(base()).instance.id == c.instance.id  # stable across restarts


def test_project_id_is_derived_from_the_service_account() -> None:
    raw = base()
    del raw["project_id"]
    assert parse(raw).project_id == "my-project"


def test_the_fast_path_is_on_unless_turned_off() -> None:
    assert parse(base()).fast_path is True
    assert parse({**base(), "fast_path": False}).fast_path is False


def test_without_service_account_email_is_the_workload_pool() -> None:
    raw = base()
    del raw["workload_identity"]["service_account"]
    assert parse(raw).email == "my-project.svc.id.goog"  # GKE-05


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda r: r.update(listen="nonsense"), "listen"),
        (lambda r: r.update(admin_listen="127.0.0.1:8080"), "admin_listen"),
        (lambda r: r.update(listen="0.0.0.0:9000", admin_listen="127.0.0.1:9000"), "admin_listen"),
        (lambda r: r.update(profile="aws"), "profile"),
        (lambda r: r.update(log_level="loud"), "log_level"),
        (lambda r: r.update(numeric_project_id="12ab"), "numeric_project_id"),
        (lambda r: r.update(surprise=1), "surprise"),
        (lambda r: r.update(fast_path="yes"), "fast_path"),
        (lambda r: r["workload_identity"].pop("audience"), "workload_identity.audience"),
        (lambda r: r["workload_identity"].update(audience="pool/prov"), "workload_identity.audience"),
        (lambda r: r["workload_identity"].update(service_account="not-an-email"), "workload_identity.service_account"),
        (lambda r: r["workload_identity"].update(token_lifetime_seconds=60),
         "workload_identity.token_lifetime_seconds"),
        (lambda r: r["workload_identity"].update(scopes=[""]), "workload_identity.scopes"),
        (lambda r: r["workload_identity"].pop("source"), "workload_identity.source"),
        (lambda r: r["workload_identity"]["source"].update(type="magic"), "workload_identity.source.type"),
        (lambda r: r["workload_identity"]["source"].pop("token_file"), "workload_identity.source.token_file"),
        (lambda r: r.update(endpoints={"sts": "ftp://x"}), "endpoints.sts"),
        (lambda r: r.update(instance={"id": "-1"}), "instance.id"),
        (lambda r: r.update(instance={"attributes": {"kube-env": "x"}}), "instance.attributes"),
    ],
)
def test_bad_config_names_the_key(mutate: Any, key: str) -> None:
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert err.value.key == key


def test_project_id_required_when_not_derivable() -> None:
    raw = base()
    del raw["project_id"]
    raw["workload_identity"]["service_account"] = "robot@example.com"
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert err.value.key == "project_id"


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "metaemu.yaml"
    path.write_text(yaml.safe_dump(base()))
    c = load_config(path=path, env={"METAEMU_LISTEN": "127.0.0.1:9999", "METAEMU_ADMIN_LISTEN": "127.0.0.1:9998",
                                    "METAEMU_LOG_LEVEL": "DEBUG"})
    assert (c.listen.port, c.admin_listen.port, c.log_level) == (9999, 9998, "debug")


def test_unreadable_and_invalid_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path=tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=bad, env={})


def external_account(tmp_path: Path, **extra: Any) -> Path:
    data = {
        "type": "external_account",
        "audience": AUD,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "http://127.0.0.1:1/v1/token",
        "service_account_impersonation_url": f"http://127.0.0.1:2/v1/projects/-/serviceAccounts/{SA}"
                                             ":generateAccessToken",
        "service_account_impersonation": {"token_lifetime_seconds": 1800},
        "credential_source": {"file": "token.json", "format": {"type": "json", "subject_token_field_name": "t"}},
        **extra,
    }
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(data))
    return path


def test_credential_config_replaces_audience_source_and_endpoints(tmp_path: Path) -> None:
    c = load_config(path=None, credential_config=external_account(tmp_path), env={})
    wi = c.workload_identity
    assert wi is not None
    assert wi.audience == AUD
    assert wi.service_account == SA
    assert wi.token_lifetime_seconds == 1800
    assert wi.source == FileSourceConfig(path=tmp_path / "token.json",
                                         token_type="urn:ietf:params:oauth:token-type:jwt",
                                         format_type="json", field_name="t")
    assert c.endpoints.sts == "http://127.0.0.1:1/v1/token"
    assert c.endpoints.iam_credentials == "http://127.0.0.1:2/v1"
    assert c.project_id == "my-project"


def test_credential_config_with_unknown_source_is_refused_clearly(tmp_path: Path) -> None:
    path = external_account(tmp_path, credential_source={"carrier_pigeon": {"coop": "x"}})
    with pytest.raises(ConfigError, match="expected one of: file, environment_id, url, executable"):
        load_config(path=None, credential_config=path, env={})


def test_credential_config_clashing_with_audience_is_refused(tmp_path: Path) -> None:
    raw = base()
    raw["workload_identity"]["credential_config"] = str(external_account(tmp_path))
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert err.value.key == "workload_identity.credential_config"


def _reference_block() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Configuration reference"):]
    return section[section.index("```yaml") + len("```yaml"):section.index("```\n", section.index("```yaml") + 7)]


def test_readme_configuration_reference_matches_the_parser() -> None:
    from metaemu.config import ENDPOINTS_KEYS, INSTANCE_KEYS, TOP_KEYS, WORKLOAD_IDENTITY_KEYS

    reference = yaml.safe_load(_reference_block())
    assert set(reference) == TOP_KEYS - {"node"}  # node: the Node mode block below
    assert set(reference["instance"]) == INSTANCE_KEYS
    assert set(reference["workload_identity"]) | {"credential_config"} == WORKLOAD_IDENTITY_KEYS
    assert set(reference["endpoints"]) == ENDPOINTS_KEYS
    config = parse(reference)  # and the documented example is a valid configuration
    assert config.profile == "gke"


def test_readme_node_mode_block_matches_the_parser() -> None:
    from metaemu.config import NODE_KEYS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("<!-- node-config -->"):]
    block = block[block.index("```yaml") + 7:block.index("```\n", block.index("```yaml") + 7)]
    reference = yaml.safe_load(block)
    assert set(reference["node"]) == NODE_KEYS
    config = parse(reference)
    assert config.mode == "node"
    assert config.node is not None
    assert config.node.name == "node-1"
    assert config.workload_identity is None


def node_raw() -> dict[str, Any]:
    return {"mode": "node", "project_id": "p", "numeric_project_id": "1", "node": {"name": "n", "audience": AUD}}


def test_node_startup_taint_defaults_on_and_turns_off_with_empty_or_null() -> None:
    node = parse(node_raw()).node
    assert node is not None and node.startup_taint == "metaemu.dev/agent-not-ready"
    for off in ("", None):
        raw = node_raw()
        raw["node"]["startup_taint"] = off
        node = parse(raw).node
        assert node is not None and node.startup_taint == ""
    raw = node_raw()
    raw["node"]["startup_taint"] = "example.com/not-ready"
    node = parse(raw).node
    assert node is not None and node.startup_taint == "example.com/not-ready"


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda r: r["node"].pop("name"), "node.name"),
        (lambda r: r["node"].update(token_expiration_seconds=60), "node.token_expiration_seconds"),
        (lambda r: r["node"].update(host_network="allow"), "node.host_network"),
        (lambda r: r["node"].update(surprise=1), "node.surprise"),
        (lambda r: r["node"].update(startup_taint="not a/taint/key"), "node.startup_taint"),
        (lambda r: r["node"].update(startup_taint="x" * 64), "node.startup_taint"),
        (lambda r: r["node"].update(startup_taint=["a"]), "node.startup_taint"),
        (lambda r: r.update(workload_identity={"audience": AUD}), "workload_identity"),
        (lambda r: r.update(mode="cluster"), "mode"),
    ],
)
def test_node_mode_config_errors_name_the_key(mutate: Any, key: str) -> None:
    assert parse(node_raw()).node is not None
    raw = node_raw()
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert err.value.key == key


def test_the_configuration_document_itself_loads_like_a_file_metaemu_config_yaml() -> None:
    """What ``metaemu webhook`` gives an injected sidecar (issue #14): the document in a variable,
    environment overrides applying on top as for a file."""
    document = json.dumps({"listen": "127.0.0.1:8988", "admin_listen": "127.0.0.1:8989", "project_id": "p",
                           "numeric_project_id": "1", "workload_identity": {
                               "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/"
                                           "p/providers/q",
                               "source": {"type": "kubernetes", "token_file": "/var/run/secrets/metaemu/token"}}})
    config = load_config(path=None, document=document, env={"METAEMU_LOG_LEVEL": "debug"})
    assert (str(config.listen), config.log_level) == ("127.0.0.1:8988", "debug")
    with pytest.raises(ConfigError, match=r"^METAEMU_CONFIG_YAML: METAEMU_CONFIG_YAML must contain a mapping"):
        load_config(path=None, document="[1]", env={})
