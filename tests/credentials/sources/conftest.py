"""Fixtures for the source tests: a neutral AWS environment, a loopback-only network, and moto as
AWS STS (upstream.md §4.4, §5; UP-12, UP-13).

A module opts in with ``pytestmark = pytest.mark.usefixtures("aws_env", "network")``: its tests start
with no ``AWS_*`` variable but ``AWS_EC2_METADATA_DISABLED=true`` and ``AWS_CONFIG_FILE`` /
``AWS_SHARED_CREDENTIALS_FILE`` pointing at files that do not exist, so neither 169.254.169.254 nor a
developer's profiles are ever consulted; the socket guard refuses (and records) any connection or
name lookup that is not loopback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metaemu.testing.fake_aws import running_moto


def _is_loopback(host: Any) -> bool:
    if host in ("localhost", "localhost.", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


class ConnectionLog:
    """Every address a test connected to (AF_INET/AF_INET6), and the refused ones."""

    def __init__(self) -> None:
        self.connected: list[Any] = []
        self.refused: list[Any] = []


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> ConnectionLog:
    """UP-12: only loopback is reachable; anything else fails fast instead of leaving the host."""
    log = ConnectionLog()
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, \
        socket.getaddrinfo

    def check(address: Any) -> None:
        if isinstance(address, str | bytes):  # AF_UNIX
            return
        if not _is_loopback(address[0]):
            log.refused.append(address)
            raise ConnectionRefusedError(f"UP-12: refused a non-loopback connection to {address!r}")
        log.connected.append(address)

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            log.refused.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"UP-12: refused to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return log


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A clean AWS environment (upstream.md §4.4); tests add what they exercise."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """moto as AWS STS on 127.0.0.1, signature checking off (UP-13); shared: its STS is stateless
    for these tests (every AssumeRoleWithWebIdentity mints new keys)."""
    with running_moto() as url:
        yield url
