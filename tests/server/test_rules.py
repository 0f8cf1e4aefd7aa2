"""Path normalisation, query parsing and the Host allow-list (security.md SEC-19, SEC-22; R-11, R-13, R-15)."""

from __future__ import annotations

import pytest

from metaemu.server.rules import DEFAULT_ALLOWED_HOSTS, HostAllowList, is_true, normalise_path, parse_query

CANON = "/computeMetadata/v1/instance/service-accounts/default/token"


@pytest.mark.parametrize(
    "raw",
    [
        CANON,
        "/computeMetadata//v1/instance/service-accounts//default/token",
        "/computeMetadata/v1/./instance/service-accounts/default/./token",
        "/computeMetadata/v1/project/../instance/service-accounts/default/token",
        "/computeMetadata/v1/instance/service-accounts/default/%74oken",
        "/computeMetadata/v1/instance%2Fservice-accounts%2Fdefault/token",
        "\\computeMetadata\\v1\\instance\\service-accounts\\default\\token",
        "/computeMetadata/v1/instance/service-accounts\\default/token",
        "/../../computeMetadata/v1/instance/service-accounts/default/token",
    ],
)
def test_sec19_every_spelling_reduces_to_the_canonical_path(raw: str) -> None:
    canonical = normalise_path(raw)
    assert canonical is not None
    assert (canonical.path, canonical.trailing_slash) == (CANON, False)


def test_sec19_case_is_not_folded_so_upper_case_reaches_nothing() -> None:
    canonical = normalise_path("/COMPUTEMETADATA/V1/instance/")
    assert canonical is not None
    assert canonical.key == "/COMPUTEMETADATA/V1/instance/"


def test_sec19_dot_dot_cannot_escape_to_admin_paths() -> None:
    canonical = normalise_path("/computeMetadata/v1/../../metrics")
    assert canonical is not None
    assert canonical.path == "/metrics"


def test_trailing_slash_and_root() -> None:
    assert normalise_path("/computeMetadata/v1/instance/").key == "/computeMetadata/v1/instance/"  # type: ignore[union-attr]
    assert normalise_path("/computeMetadata/v1/instance/.").key == "/computeMetadata/v1/instance/"  # type: ignore[union-attr]
    assert normalise_path("/").key == "/"  # type: ignore[union-attr]
    assert normalise_path("//").key == "/"  # type: ignore[union-attr]


def test_control_characters_are_refused() -> None:
    assert normalise_path("/computeMetadata/v1/%00instance/") is None
    assert normalise_path("/computeMetadata/v1/instance%0d%0a/") is None


def test_r15_unencoded_audience_is_parsed() -> None:
    q = parse_query("format=full&audience=https://example.test/aud?x")
    assert q == {"format": "full", "audience": "https://example.test/aud?x"}
    assert parse_query("audience=https%3A%2F%2Fexample.test%2Faud")["audience"] == "https://example.test/aud"
    assert parse_query("audience=a&audience=b")["audience"] == "a"


def test_r13_boolean_values_are_case_insensitive() -> None:
    assert all(is_true(v) for v in ("true", "True", "TRUE", "1", "yes", "on"))
    assert not any(is_true(v) for v in (None, "", "false", "0", "no", "xyz"))


@pytest.mark.parametrize("host", ["169.254.169.254", "169.254.169.254:80", "metadata.google.internal",
                                  "metadata.google.internal.", "metadata", "METADATA.GOOGLE.INTERNAL",
                                  "127.0.0.1:8080", "localhost:1234", "[::1]:8080", None, ""])
def test_sec22_host_allow_list_accepts_every_name_clients_send(host: str | None) -> None:
    assert HostAllowList(DEFAULT_ALLOWED_HOSTS).allows(host)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "169.254.169.254.evil.example",
                                  "metadata.google.internal.evil", "127.0.0.2:80", "localhost:http"])
def test_sec22_host_allow_list_refuses_rebinding_names(host: str) -> None:
    assert not HostAllowList(DEFAULT_ALLOWED_HOSTS).allows(host)
