"""Listening sockets that two agents share during a surge upgrade (issue #11).

In node mode the old and the new agent listen on the same address at once: both sockets set
``SO_REUSEPORT`` and form one reuseport group (Linux allows it only between sockets of the same
effective UID). By default the kernel spreads new connections over the group by a hash; closing a
listener then resets every connection still queued on it (its accept queue, and handshakes in
flight), unless ``net.ipv4.tcp_migrate_req=1`` moves them to another member. That sysctl is a
node-wide setting that neither the serving container (no capability, read-only ``/proc/sys``) nor
a Kubernetes pod spec (namespaced sysctls are refused for hostNetwork pods) can set, so metaemu does
not rely on it: it makes sure nothing is queued on the old socket instead.

Each listener attaches a classic BPF reuseport program (``SO_ATTACH_REUSEPORT_CBPF``, no capability
needed) that returns index 1: the group's second socket. The kernel keeps sockets in join order and,
when one leaves, moves the last into its place, and an index past the end means "use the hash". So:

- one agent alone (index 0): every connection is its own, as without the program;
- a successor joins (index 1) only once it is warm (``MetaemuServer`` binds it last): from that
  moment every new connection goes to it, and the old agent's queue only drains;
- the old agent leaves: the successor is index 0 and alone again.

The program belongs to the group, so it steers to a joiner even before the joiner attaches its own
copy. A third agent on the same address (never under ``maxSurge: 1``) would get no connections until
one of the others leaves.
"""

from __future__ import annotations

import ctypes
import socket

#: linux/asm-generic/socket.h; Python's socket module does not export it.
SO_ATTACH_REUSEPORT_CBPF = 51
#: BPF_RET | BPF_K: return the constant (linux/filter.h).
_BPF_RET_K = 0x06
#: The reuseport index of the socket that gets new connections while two share the address.
STEER_TO_INDEX = 1


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def steer_to_newest(sock: socket.socket) -> None:
    """Attach the group's program (see the module docstring); raises OSError if the kernel refuses."""
    program = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, STEER_TO_INDEX))
    fprog = _SockFprog(1, ctypes.cast(program, ctypes.POINTER(_SockFilter)))
    # setsockopt copies the struct; the kernel reads the program through its pointer during the call.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def shared_listener(host: str, port: int, *, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """A listening TCP socket on ``host:port`` in the address's reuseport group, steering new
    connections to the group's second member. Raises OSError (the address is taken by a socket
    without SO_REUSEPORT or of another user, or is not local)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        steer_to_newest(sock)  # after listen: the socket is in the group, and the group gets the program
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
