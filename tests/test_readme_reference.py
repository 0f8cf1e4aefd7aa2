"""The README's command-line reference names every flag of every subcommand and every environment
variable metaemu reads or sets for a child process (issue #13): a flag or variable added without
documentation fails here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from metaemu import cli, image_credentials, node_setup
from metaemu.doctor import cli as doctor_cli
from metaemu.webhook import main as webhook

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
REFERENCE = README[README.index("### Command-line reference"):README.index("## Node mode")]


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    top = cli._parser()
    (sub,) = (a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    parsers = dict(sub.choices)
    # These parse their own arguments (their subparsers only route to them).
    parsers["node-setup"] = node_setup.build_parser()
    parsers["webhook"] = webhook.build_parser()
    parsers["credential-provider"] = image_credentials.build_parser({})
    parsers["doctor"] = doctor_cli.build_parser()
    return parsers


def flags() -> list[tuple[str, str]]:
    return [(name, option) for name, parser in subcommand_parsers().items() for action in parser._actions
            for option in action.option_strings if option.startswith("--") and option != "--help"]


def test_the_reference_lists_every_subcommand() -> None:
    for name in subcommand_parsers():
        assert f"`metaemu {name}" in REFERENCE, name


@pytest.mark.parametrize(("command", "flag"), flags())
def test_every_flag_of_every_subcommand_is_in_the_reference(command: str, flag: str) -> None:
    assert re.search(rf"`metaemu {re.escape(command)} {re.escape(flag)}[ `]", REFERENCE), f"{command} {flag}"


def environment_variables() -> set[str]:
    """Every variable the package reads (``environ.get("X")``, ``env["X"]``, ``X_ENV = "X"``, the
    configuration's overrides) or hands to an executable, found in its source."""
    names: set[str] = set()
    for path in (ROOT / "metaemu").rglob("*.py"):
        if "testing" in path.parts:
            continue
        source = path.read_text()
        names |= set(re.findall(r"\benv(?:iron)?(?:\.get\(|\[)\"([A-Z][A-Z0-9_]+)\"", source))
        names |= set(re.findall(r"_ENV = \"([A-Z][A-Z0-9_]+)\"", source))
        names |= set(re.findall(r"\"((?:METAEMU|GOOGLE_EXTERNAL_ACCOUNT)_[A-Z0-9_]+)\"", source))
    return names


def test_the_source_scan_finds_the_variables_it_should() -> None:
    found = environment_variables()
    assert {"METAEMU_CONFIG", "GCP_AUDIENCE", "METAEMU_STS_URL", "METAEMU_IPV6", "METAEMU_NODE_IPS",
            "KUBERNETES_SERVICE_HOST", "AWS_WEB_IDENTITY_TOKEN_FILE", "GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE"} <= found


@pytest.mark.parametrize("name", sorted(environment_variables()))
def test_every_environment_variable_is_in_the_reference(name: str) -> None:
    assert f"`{name}" in REFERENCE, name
