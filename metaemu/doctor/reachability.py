"""The metadata server as an app sees it: the names Google clients use resolve to the metadata
address (gce-metadata.md H-02, H-03), and the address answers with ``Metadata-Flavor: Google``
(HD-02) and serves the default account's email and token (SA-06).

The names, the address and the resolver are parameters, so tests point the doctor at a loopback
metaemu; nothing here has a built-in address. SECURITY: the token answer is checked, never shown.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

from metaemu.doctor.report import Check, Report
from metaemu.transport import HttpClient, HttpRequest, HttpResponse, TransportFailure

#: What Google's clients resolve (H-02 and the search-domain short name, H-03).
DEFAULT_NAMES = ("metadata.google.internal", "metadata")
DEFAULT_ADDRESS = "169.254.169.254"
#: google-auth's GCE_METADATA_TIMEOUT default (3 s): what an app gives the server before it gives up.
PROBE_TIMEOUT_S = 3.0
SA_PATH = "/computeMetadata/v1/instance/service-accounts/default/"
HOSTS_FIX = ("map the names to 169.254.169.254: a CoreDNS hosts block "
             "(hosts { 169.254.169.254 metadata.google.internal metadata\\n fallthrough }) or the pod's hostAliases")

Resolver = Callable[[str], Awaitable[list[str]]]


async def system_resolver(name: str) -> list[str]:
    """The addresses ``name`` resolves to, as the libc resolver an app uses sees them."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def check_names(report: Report, names: Sequence[str], *, address: str, resolver: Resolver) -> bool:
    host = address.rpartition(":")[0] if address.count(":") == 1 else address
    found: dict[str, str] = {}
    wrong: list[str] = []
    for name in names:
        try:
            addresses = await resolver(name)
        except OSError as exc:
            addresses, found[name] = [], f"does not resolve ({exc.strerror or exc})"
        else:
            found[name] = ", ".join(addresses) or "(nothing)"
        if not any(_same(a, host) for a in addresses):
            wrong.append(name)
    if wrong:
        report.add(Check(name="metadata names", status="fail", summary=f"{', '.join(wrong)} do not resolve to "
                         f"{host}", details=found, diagnosis="metadata.names", fix=HOSTS_FIX))
        return False
    report.add(Check(name="metadata names", status="ok", summary=f"resolve to {host}", details=found))
    return True


async def check_server(report: Report, *, address: str, http: HttpClient) -> bool:
    base = f"http://{address}"
    try:
        root = await _get(http, base + "/")
        if _flavor(root) != "Google":
            report.add(Check(name="metadata server", status="fail", summary=f"{address} answers without "
                             "Metadata-Flavor: Google (not a metadata server: clients will not use it)",
                             details={"status": str(root.status)}, diagnosis="metadata.not_google",
                             fix="make 169.254.169.254 reach metaemu (node-setup's rules, or the sidecar's listen)"))
            return False
        email = await _get(http, base + SA_PATH + "email")
        token = await _get(http, base + SA_PATH + "token")
    except TransportFailure as exc:
        report.add(Check(name="metadata server", status="fail", summary=f"nothing answers at {address}",
                         cause=exc.detail, diagnosis="metadata.unreachable",
                         fix="start metaemu (or check its listen address and the interception rules)"))
        return False
    details = {"email": email.body.decode(errors="replace")[:200] if email.status == 200 else f"HTTP {email.status}"}
    if token.status != 200:
        reason = " ".join(token.body.decode(errors="replace").split())[:300]  # metaemu's reasons hold no token
        report.add(Check(name="metadata server", status="fail", summary=f"the token answer is {token.status}",
                         details=details, upstream=reason, diagnosis="metadata.token",
                         fix="run the doctor with the same --config as the server to find the broken step"))
        return False
    report.add(Check(name="metadata server", status="ok", summary=f"{address} answers as Google's and serves a "
                     "token", details=details))
    return True


async def _get(http: HttpClient, url: str) -> HttpResponse:
    return await http.send(HttpRequest(method="GET", url=url, headers={"Metadata-Flavor": "Google"},
                                       timeout_s=PROBE_TIMEOUT_S))


def _flavor(response: HttpResponse) -> str | None:
    return next((v for k, v in response.headers.items() if k.lower() == "metadata-flavor"), None)


def _same(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return a == b
