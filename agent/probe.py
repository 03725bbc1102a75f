"""Whether the address a collector did not answer at is something else: an HTTP/1 server.

An agent given the collector's /metrics port (the address a user had just opened in a browser)
logged "no collector answering", as for a collector that is down, and retried for ever. The
sender asks here once a connect failed: it opens a plain socket (the training process imports
no gRPC), sends the HTTP/2 preface every gRPC client sends, and reads the first frame. A gRPC
server answers with its SETTINGS frame; whatever answers something else is not a collector.
"""

from __future__ import annotations

import socket

from thermoscope.wire.contract import DEFAULT_GRPC, split_address

#: HTTP/2's client connection preface and an empty SETTINGS frame (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
#: The type of a SETTINGS frame: the fourth byte of a frame's header.
SETTINGS = 4


def not_a_collector(target: str, timeout: float = 1.0) -> str | None:
    """Why `target` ("host:port", plaintext) is not a collector, if it answered; None if it did not
    answer (down, filtered) or answered as an HTTP/2 server does (some other failure)."""
    host, port = split_address(target)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(PREFACE)
            first = sock.recv(9)
    except OSError:
        return None
    if not first or (len(first) >= 4 and first[3] == SETTINGS):
        return None
    return (
        f"{target} answered, but not as a collector: it does not speak gRPC (HTTP/2), so it is not "
        f"the collector's gRPC port (a /metrics port? agents stream to --grpc, default {DEFAULT_GRPC})"
    )
