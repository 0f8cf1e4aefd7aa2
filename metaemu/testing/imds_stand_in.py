"""The EC2 instance metadata service (``FakeImds``, IMDSv2 required) on a socket, as a process of
its own: the stand-in for AWS's IMDS behind a simulated node (tests/kube/test_passthrough_node.py
runs it in the node's "cloud" network namespace at 169.254.169.254:80).

The IMDSv2 hop limit is modelled as EC2 applies it (``HttpPutResponseHopLimit``, EC2 user guide,
"Use IMDSv2"): the answer to ``PUT /latest/api/token`` leaves with that IP TTL (``--hop-limit``,
EC2's default 1), so it reaches a client at most that many hops away and a router beyond drops it;
a container behind its node is one hop further than the node. Set on the connection's socket once
the token request has arrived (the handshake and earlier answers keep the default TTL).

Every request it receives is appended to ``--log`` as one JSON line, before it is answered:
``method``, ``path`` (the raw target), ``headers`` (every field as sent, in order, as pairs),
``peer`` (the TCP peer address the kernel reported) and ``body``; a test reads the file to prove
what reached IMDS and what never did.

``python -m metaemu.testing.imds_stand_in --listen ADDR:PORT [--listen ...] --log FILE [--hop-limit N]``
prints ``READY`` once it listens on every address and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from metaemu.config import HostPort
from metaemu.pods.identity import peer_ip_of
from metaemu.testing.fake_aws import AwsKey, FakeImds
from metaemu.transport import HttpRequest

#: The node role FakeImds serves: the relay's default rules must never let a pod read it.
NODE_ROLE = "eks-node-role"
NODE_KEY = AwsKey(access_key_id="ASIANODEROLEKEY00001", secret_access_key="node-role-secret",
                  session_token="node-role-session", arn=f"arn:aws:sts::123456789012:assumed-role/{NODE_ROLE}/i-fake")


#: EC2's default ``HttpPutResponseHopLimit`` (ModifyInstanceMetadataOptions: "Default: 1").
DEFAULT_HOP_LIMIT = 1


def imds_app(imds: FakeImds, log_path: Path, *, hop_limit: int | None = None) -> web.Application:
    """``imds`` as an aiohttp application that logs each request to ``log_path`` first; with
    ``hop_limit``, token answers leave with that IP TTL (the module docstring)."""

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        entry = {"method": request.method, "path": request.raw_path, "headers": list(request.headers.items()),
                 "peer": peer_ip_of(request), "body": body.decode(errors="replace")}
        with log_path.open("a") as log:
            log.write(json.dumps(entry) + "\n")
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        if hop_limit is not None and request.method == "PUT" and sock is not None:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hop_limit)
        reply = await imds.handle(HttpRequest(method=request.method, url=str(request.url),
                                              headers=dict(request.headers), body=body))
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def serve(listen: list[HostPort], log_path: Path, availability_zone: str, hop_limit: int) -> None:
    imds = FakeImds(role_name=NODE_ROLE, credentials=NODE_KEY, availability_zone=availability_zone)
    runner = web.AppRunner(imds_app(imds, log_path, hop_limit=hop_limit), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for address in listen:
            await web.TCPSite(runner, address.host, address.port).start()
        print("READY", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metaemu.testing.imds_stand_in")
    p.add_argument("--listen", action="append", required=True, help="ADDR:PORT, e.g. 169.254.169.254:80 (repeatable)")
    p.add_argument("--log", type=Path, required=True, help="JSON lines, one per request received")
    p.add_argument("--availability-zone", default="eu-west-3b")
    p.add_argument("--hop-limit", type=int, default=DEFAULT_HOP_LIMIT, help="IP TTL of token answers (1..64)")
    args = p.parse_args(argv)
    listen = [HostPort.parse("--listen", value) for value in args.listen]
    asyncio.run(serve(listen, args.log, args.availability_zone, args.hop_limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
