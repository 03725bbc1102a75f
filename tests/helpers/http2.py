"""A client that speaks raw HTTP/2 frames to a gRPC server (no `h2` library needed): the
preface, SETTINGS, then PINGs as fast as the socket takes them, as a hostile client floods them.

It reads what the server says meanwhile, so that the test sees the GOAWAY and when the server
closed the connection (EOF), not only what it sent.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ACK = 0x1


def frame(kind: int, flags: int, payload: bytes, stream: int = 0) -> bytes:
    """One HTTP/2 frame: a 24-bit length, its type, flags and stream id, then the payload."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


@dataclass
class Flood:
    """What a PING flood saw: PINGs sent, the GOAWAY's error code (None: none came), seconds from
    the GOAWAY until the server closed the connection (None: it did not within the run)."""

    sent: int = 0
    acks_after_goaway: int = 0
    goaway: int | None = None
    goaway_at: float | None = None
    closed_at: float | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def closed_after_goaway(self) -> float | None:
        if self.goaway_at is None or self.closed_at is None:
            return None
        return max(0.0, self.closed_at - self.goaway_at)


def ping_flood(host: str, port: int, seconds: float, pause: float = 0.0) -> Flood:
    """Open a connection and send PINGs for `seconds`, or until the server closes it; `pause`:
    seconds between the connection's preface and the first PING."""
    flood, done = Flood(), threading.Event()
    with socket.create_connection((host, port), timeout=1) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, b""))
        time.sleep(pause)
        reader = threading.Thread(target=_read, args=(sock, flood, done), daemon=True)
        reader.start()
        pings = frame(PING, 0, b"flooding") * 64
        deadline = flood.started + seconds
        while time.monotonic() < deadline and flood.closed_at is None:
            try:
                sock.sendall(pings)
                flood.sent += 64
            except TimeoutError:  # the server reads no more for now
                continue
            except OSError:  # it closed (reset) the connection
                flood.closed_at = flood.closed_at or time.monotonic()
                break
        done.set()
        reader.join(timeout=2)
    return flood


def _read(sock: socket.socket, flood: Flood, done: threading.Event) -> None:
    """Read the server's frames until EOF (or `done`): its SETTINGS, PING ACKs and the GOAWAY."""
    buffer = b""
    while not done.is_set():
        if not select.select([sock], [], [], 0.1)[0]:
            continue
        try:
            data = sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            flood.closed_at = time.monotonic()
            return
        buffer += data
        at = 0
        while len(buffer) - at >= 9:
            length = int.from_bytes(buffer[at : at + 3], "big")
            if len(buffer) - at < 9 + length:
                break
            kind, payload = buffer[at + 3], buffer[at + 9 : at + 9 + length]
            at += 9 + length
            if kind == PING and flood.goaway is not None:
                flood.acks_after_goaway += 1
            if kind == GOAWAY and flood.goaway is None:
                flood.goaway = struct.unpack(">I", payload[4:8])[0]
                flood.goaway_at = time.monotonic()
        buffer = buffer[at:]
