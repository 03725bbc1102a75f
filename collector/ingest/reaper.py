"""Closes the gRPC port's connections that grpc meant to close but kept reading: a PING flood's.

A client that floods HTTP/2 PINGs earns its strikes and gets GOAWAY `too_many_pings` (the policy
of `keepalive.py`), and grpc then closes the connection, but only once no write is in progress.
Each further PING is answered or re-sends the GOAWAY (a write), so a client that keeps flooding
keeps a write in progress: the connection is never closed and grpc goes on reading and answering
its PINGs, about one core per such connection. Nothing among grpc's options bounds it (grpc 1.85:
2 floods in 5 kept open, whatever the keepalive, ping-timeout, idle or age limits); which floods
it keeps is a race with grpc's own first writes.

So the collector looks at its own connections on the gRPC port as the kernel sees them (Linux:
`/proc/self/fd` and `TCP_INFO`), every `INTERVAL` s: one that received more than `FLOOD_BYTES`
since the last look (or since it opened), or that holds as much unread (grpc stopped reading a
flood it sent GOAWAY, and never closed it), `LOOKS` looks more than it did not (a flooder starved
of CPU for a look is not forgiven its earlier ones), without an open `Telemetry` call at any of
them or the look before, is shut down (the client reads EOF; grpc ends the
transport). Without a call, an honest client sends next to nothing (an agent's channel between two
streams pings every 30 s, 17 bytes; a health check is a few hundred bytes) but for the rest of a
message whose call was refused, which its flow-control window bounds and which ends within a look
or two; a PING flood sends hundreds of kilobytes a second and more, for as long as it lasts. A call
of its own does not shelter a flood: the GOAWAY ends the connection's calls at once, before the
close that waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
from collections.abc import Callable, Collection, Iterator

log = logging.getLogger("thermoscope.collector")

#: Seconds between two looks at the connections.
INTERVAL = 1.0
#: Bytes a connection without a call may receive between two looks (a flood's are megabytes).
FLOOD_BYTES = 16 << 10
#: Looks a connection must flood, net of those it did not, to be shut down: the rest of a refused message
#: (up to its flow-control window, megabytes) may still arrive just after its call ended.
LOOKS = 3
#: `struct tcp_info`'s tcpi_bytes_received (Linux 4.1+).
_BYTES_RECEIVED = struct.Struct("=Q")
_BYTES_RECEIVED_OFFSET = 128


async def reap(port: int, callers: Callable[[], Collection[str]]) -> None:
    """Every `INTERVAL` s, shut down the connections to `port` that flood without a call, until
    cancelled. `callers()`: the peers (gRPC's `context.peer()`) with a call open now or opened
    since the last look."""
    if not hasattr(socket, "TCP_INFO") or not os.path.isdir("/proc/self/fd"):
        return  # not Linux: nothing to look at
    seen: dict[str, tuple[int, int]] = {}  # peer -> (bytes received, looks in a row it flooded)
    busy: set[str] = set()  # peers with a call at the last look
    while True:
        await asyncio.sleep(INTERVAL)
        now: dict[str, tuple[int, int]] = {}
        calling = set(callers())
        spared, busy = busy | calling, calling  # a call that just ended: its last frames came meanwhile
        for conn in connections(port):
            with conn:
                try:
                    peer = grpc_peer(conn)
                    total = received(conn)
                except OSError:  # closed meanwhile
                    continue
                before, looks = seen.get(peer, (0, 0))  # a new connection: all it received
                # received much, or holds much that grpc stopped reading (a flood it gave up on)
                flooding = peer not in spared and max(total - before, unread(conn)) > FLOOD_BYTES
                now[peer] = total, looks + 1 if flooding else max(0, looks - 1)  # (a look it idled)
                if now[peer][1] < LOOKS:
                    continue
                log.warning(
                    "closed a gRPC connection from %s: over %d bytes a second for %d s without a call "
                    "(a PING flood)",
                    peer,
                    FLOOD_BYTES,
                    LOOKS * INTERVAL,
                )
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        seen = now


def connections(port: int) -> Iterator[socket.socket]:
    """This process' connected TCP sockets whose local port is `port`, each a socket object over a
    duplicate of grpc's descriptor (closing it leaves grpc's open; shutting it down does not)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            conn = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # closed meanwhile
            continue
        try:
            if (
                conn.type == socket.SOCK_STREAM
                and conn.family in (socket.AF_INET, socket.AF_INET6)
                and conn.getsockname()[1] == port
                and conn.getpeername()  # the listening socket has no peer (OSError)
            ):
                yield conn
                continue
        except OSError:
            pass
        conn.close()


def received(conn: socket.socket) -> int:
    """Bytes the connection has received, by the kernel's count."""
    info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _BYTES_RECEIVED_OFFSET + _BYTES_RECEIVED.size)
    return _BYTES_RECEIVED.unpack_from(info, _BYTES_RECEIVED_OFFSET)[0]


def unread(conn: socket.socket) -> int:
    """Bytes the connection has received that its reader (grpc) has not read yet."""
    return struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def grpc_peer(conn: socket.socket) -> str:
    """The connection's peer as gRPC's `context.peer()` writes it (`ipv4:H:P`, `ipv6:[H]:P`)."""
    host, port = conn.getpeername()[:2]
    if conn.family == socket.AF_INET6:
        if host.startswith("::ffff:") and "." in host:  # an IPv4 client on a dual-stack socket
            return f"ipv4:{host[7:]}:{port}"
        return f"ipv6:[{host}]:{port}"
    return f"ipv4:{host}:{port}"
