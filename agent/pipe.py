"""Messages over a local socket between a training process and its relay (`agent/relay.py`).

A message is `<length: u32 little-endian> <kind: u8> <length - 1 bytes of payload>`. A `Pipe`
sends from any thread (one lock keeps messages whole) and receives on one thread, with an
optional timeout, so the reader can interleave waiting for a reply with other work. Nothing here
imports gRPC: the training process talks to the relay through this alone.
"""

from __future__ import annotations

import enum
import select
import socket
import struct
import threading

_LENGTH = struct.Struct("<I")
#: The largest message either side accepts: a frame is bounded by the collector's own limit
#: (64 MiB by default), and a length beyond this is a broken peer, not a frame.
MAX_MESSAGE = 256 << 20


class Kind(enum.IntEnum):
    """What a message is. To the relay: SETUP .. CANCEL; from it: CONNECTED .. LOG."""

    SETUP = 1  # JSON: how to reach collectors (security, backoff)
    CONNECT = 2  # JSON {"target", "timeout"}: make the channel to target READY
    OPEN = 3  # a serialized hello: open a stream with it
    FRAME = 4  # a serialized frame of the open stream
    END = 5  # no more frames: half-close the open stream
    CANCEL = 6  # cancel the open stream (or the connect under way)
    FINISH = 7  # the training process is closing: if the socket ends now, end the stream as finished
    CONNECTED = 20  # b"1": READY; b"0": not within the timeout
    OPENED = 21  # the collector answered the stream
    ACK = 22  # <u64 seq><u64 durable>
    CONFIG = 23  # a serialized Config
    CLOSED = 24  # the stream ended; the payload says why ("" : the collector ended it)
    LOG = 25  # JSON {"level", "message"}: a log record of the relay, for the training process' log


ACK = struct.Struct("<QQ")


class PipeClosed(EOFError):
    """The other end is gone (it closed the socket, or its process died)."""


class Pipe:
    """One end of the socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._buffer = bytearray()

    def send(self, kind: Kind, payload: bytes = b"") -> None:
        """Send one message (whole, even from several threads); PipeClosed if the peer is gone."""
        header = _LENGTH.pack(len(payload) + 1) + bytes((kind,))
        try:
            with self._send_lock:
                self.sock.sendall(header + payload if len(payload) < 65536 else header)
                if len(payload) >= 65536:
                    self.sock.sendall(payload)
        except OSError as exc:
            raise PipeClosed(str(exc)) from None

    def recv(self, timeout: float | None = None) -> tuple[Kind, bytes] | None:
        """The next message; None if none came within `timeout` seconds (None: wait for one).
        PipeClosed when the peer is gone."""
        while (message := self._take()) is None:
            if timeout is not None:
                readable, _, _ = select.select([self.sock], [], [], timeout)
                if not readable:
                    return None
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError as exc:
                raise PipeClosed(str(exc)) from None
            if not chunk:
                raise PipeClosed("the other end closed the pipe")
            self._buffer += chunk
        return message

    def _take(self) -> tuple[Kind, bytes] | None:
        """A whole message from the buffer, or None if it holds only part of one."""
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if not 1 <= length <= MAX_MESSAGE:
            raise PipeClosed(f"a message of {length} bytes: the other end is broken")
        if len(self._buffer) < _LENGTH.size + length:
            return None
        try:
            kind = Kind(self._buffer[_LENGTH.size])
        except ValueError:
            raise PipeClosed(f"a message of unknown kind {self._buffer[_LENGTH.size]}") from None
        payload = bytes(self._buffer[_LENGTH.size + 1 : _LENGTH.size + length])
        del self._buffer[: _LENGTH.size + length]
        return kind, payload

    def close(self) -> None:
        """Close this end (the peer reads end of file). In a forked child this closes only the
        child's copy of the descriptor: the parent's pipe is untouched."""
        self.sock.close()
