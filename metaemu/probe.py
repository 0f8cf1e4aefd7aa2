"""``metaemu probe ready|live --socket PATH``: kubelet's exec probe of node mode (issue #11).

During a surge upgrade two agents share the admin TCP address (``admin_listen``), so an HTTP probe
there may be answered by the other agent: the old one would vouch for a new agent that is still
warming. The probe asks this pod's own agent instead, over its Unix socket (``admin_socket``, in
the pod's own emptyDir). Standard library only, so that a probe every few seconds costs a Python
start and nothing more (no aiohttp import). Exit 0 when ``/readyz`` or ``/healthz`` answers 200,
1 otherwise, with the agent's answer (or the error) on stderr.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
from collections.abc import Sequence
from typing import TextIO

#: Below kubelet's probe timeoutSeconds (daemonset.yaml sets 5), and the agent answers from memory.
PROBE_TIMEOUT_S = 4.0
_PATHS = {"ready": "/readyz", "live": "/healthz"}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, *, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def main(argv: Sequence[str], *, stderr: TextIO | None = None) -> int:
    err = stderr or sys.stderr
    p = argparse.ArgumentParser(prog="metaemu probe", description="node mode's exec probe: ask this pod's "
                                "own agent over its admin Unix socket")
    p.add_argument("check", choices=sorted(_PATHS), help="ready: /readyz; live: /healthz")
    p.add_argument("--socket", required=True, help="the agent's admin_socket path")
    args = p.parse_args(list(argv))
    connection = _UnixConnection(args.socket, timeout_s=PROBE_TIMEOUT_S)
    try:
        connection.request("GET", _PATHS[args.check])
        response = connection.getresponse()
        body = response.read().decode(errors="replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        print(f"metaemu probe: {args.socket}: {exc.__class__.__name__}: {exc}", file=err)
        return 1
    finally:
        connection.close()
    if response.status != 200:
        print(f"metaemu probe: {response.status} {body}", file=err)
        return 1
    return 0
