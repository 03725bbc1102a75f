"""`/metrics` over HTTP(S): a server that idle and slow clients cannot exhaust.

The server. One thread (`MetricsServer.serve_forever`) accepts connections and reads their
request heads without blocking (the TLS handshake too); a connection whose head is not whole
within `HttpLimits.timeout` is closed, and only a whole request goes to one of a few worker
threads, which answer it with wsgiref's handler. So an idle or slow client holds a socket and a
few bytes, never a thread: before, each connection had a thread with no timeout, and 1,012
half-sent requests took every file descriptor of a collector (its limit was 1,024) and its
scrapes failed. Connections are bounded (`HttpLimits.max_connections`): beyond it the oldest
one still sending its head is closed to make room, so a scrape gets in however many idle
clients there are (docs/security.md has the measurements).

The answer goes back the same way: a worker writes it into memory, and the accepting thread
sends it without blocking, closing a client that reads none of it for `HttpLimits.timeout`.
Before, the worker itself wrote it, so clients that sent whole requests and never read the
answer held every worker for the timeout at each write, and scrapes waited their turn (40 of
them with an 8 MB page: a scrape waited 24.5 s). The answers held are bounded
(`HttpLimits.max_buffered_bytes`: beyond it the answer that has waited longest for its client
is dropped), and so is each connection's kernel send buffer (`SEND_BUFFER`).

Basic auth, when asked for, wraps the app (passwords.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ..credentials import AuthConfigError
from .passwords import BasicAuth, PasswordCheck

log = logging.getLogger("thermoscope.collector")

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
#: Bytes of an answer the kernel may hold for one connection (SO_SNDBUF; Linux doubles it): the
#: rest waits in `_Sending`, counted against `HttpLimits.max_buffered_bytes`.
SEND_BUFFER = 256 << 10
#: The most of an answer one non-blocking send offers the kernel.
_CHUNK = 256 << 10


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on what /metrics clients may make the collector hold.

    `timeout`: seconds a client has from connecting to the end of its request head (a TLS
    handshake included), then for each read of its request's rest, and while its answer is sent,
    for reading some of it (one that reads nothing for as long is closed); `max_connections`:
    connections open at once (beyond it the oldest still sending its head is closed to make room;
    if every one is a whole request, the new connection is closed at once); `workers`: threads
    answering whole requests (more wait their turn); `max_head_bytes`: the longest request head
    (a Prometheus scrape's is under 1 KiB; a longer one is answered 431 and closed);
    `max_buffered_bytes`: answers held for clients still reading them (beyond it, the one whose
    client read nothing for longest is dropped; one answer alone is always sent).
    """

    timeout: float = 5.0
    max_connections: int = 256
    workers: int = 8
    max_head_bytes: int = 16 << 10
    max_buffered_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("timeout", "max_connections", "workers", "max_head_bytes", "max_buffered_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class _Waiting:
    """A connection whose request head has not all arrived."""

    __slots__ = ("address", "deadline", "handshaken", "head", "sock")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock, self.address, self.deadline = sock, address, deadline
        self.head = bytearray()
        self.handshaken = not isinstance(sock, ssl.SSLSocket)


class _Sending:
    """A connection whose answer the client has not all read."""

    __slots__ = ("address", "deadline", "left", "sock")

    def __init__(self, sock: socket.socket, address: Any, answer: bytes, deadline: float) -> None:
        self.sock, self.address, self.deadline = sock, address, deadline
        self.left = memoryview(answer)


class _Replayed(io.RawIOBase):
    """The request head the server read ahead, then the rest of the connection."""

    def __init__(self, head: bytes, rest: io.BufferedReader) -> None:
        self._head, self._rest = memoryview(head), rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        return self._rest.readinto1(buffer)

    def close(self) -> None:
        self._rest.close()
        super().close()


class _Handler(WSGIRequestHandler):
    """wsgiref's handler of one request, reading first the head the server already read, and
    writing its answer into memory (`answer`), for the server to send without blocking."""

    def __init__(self, request, client_address, server, head: bytes) -> None:
        self._head = head
        self.answer = b""
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_Replayed(self._head, self.rfile))
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        self.answer = self.wfile.getvalue()  # type: ignore[attr-defined]
        super().finish()

    def log_message(self, format: str, *args: object) -> None:
        pass


class MetricsServer(WSGIServer):
    """wsgiref's server, with one thread that accepts and reads request heads without blocking
    (`serve_forever`) and `HttpLimits.workers` threads that answer whole requests."""

    request_queue_size = 128  # the listen backlog, for bursts the accepting thread has not reached

    def __init__(self, address: tuple[str, int], limits: HttpLimits, context: ssl.SSLContext | None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.limits = limits
        self._waiting: dict[socket.socket, _Waiting] = {}  # in the order accepted: of deadlines too
        self._answering = 0  # connections handed to the workers and not yet closed
        self._lock = threading.Lock()
        self._ready: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._sending: dict[socket.socket, _Sending] = {}  # the least recently read from first
        self._buffered = 0  # bytes of answers not yet sent
        self._answers: queue.SimpleQueue[_Sending] = queue.SimpleQueue()  # from the workers
        self._wake_read, self._wake = socket.socketpair()  # a worker's answer wakes `serve_forever`
        self._wake_read.setblocking(False)
        self._wake.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._stop, self._stopped = threading.Event(), threading.Event()
        self._stopped.set()
        self._workers: list[threading.Thread] = []
        super().__init__(address, _Handler)  # binds and listens (OSError if it cannot: closed again)
        if context is not None:
            # handshakes happen in `serve_forever`, without blocking, under the head's deadline
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        for i in range(limits.workers):
            worker = threading.Thread(target=self._work, name=f"thermoscope-metrics-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept, read heads, close what is past its deadline, until `shutdown`."""
        self._stopped.clear()
        self.socket.setblocking(False)
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                wait = poll_interval
                for pending in (self._waiting, self._sending):
                    if pending:
                        first = next(iter(pending.values()))
                        wait = min(wait, max(0.0, first.deadline - time.monotonic()))
                for key, _ in self._selector.select(wait):
                    if key.fileobj is self.socket:
                        self._accept()
                    elif key.fileobj is self._wake_read:
                        self._take_answers()
                    elif isinstance(key.data, _Sending):
                        if key.data.sock in self._sending:  # not dropped to make room meanwhile
                            self._send(key.data)
                    elif key.data.sock in self._waiting:  # not closed by `_accept` meanwhile
                        self._read(key.data)
                now = time.monotonic()
                while self._waiting and (first := next(iter(self._waiting.values()))).deadline <= now:
                    self._drop(first)
                while self._sending and (late := next(iter(self._sending.values()))).deadline <= now:
                    self._finish(late)  # its client read nothing for the timeout
        finally:
            self._selector.unregister(self.socket)
            self._selector.unregister(self._wake_read)
            for waiting in list(self._waiting.values()):
                self._drop(waiting)
            self._take_answers()
            for sending in list(self._sending.values()):
                self._finish(sending)
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait until it has (requests being answered finish on their own)."""
        self._stop.set()
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        for _ in self._workers:
            self._ready.put(None)
        self._selector.close()
        self._wake_read.close()
        self._wake.close()

    def handle_error(self, request, client_address) -> None:  # a client gone, a timeout: no traceback
        log.debug("/metrics: a request from %s failed", client_address, exc_info=True)

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors: closing the oldest frees one
                log.debug("/metrics: cannot accept a connection: %s", exc)
                if not self._make_room():
                    time.sleep(0.05)  # the listening socket stays readable: do not spin
                return
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            if len(self._waiting) + self._answering >= self.limits.max_connections and not self._make_room():
                sock.close()  # every connection is a whole request being answered: refused at once
                continue
            waiting = _Waiting(sock, address, time.monotonic() + self.limits.timeout)
            self._waiting[sock] = waiting
            self._selector.register(sock, selectors.EVENT_READ, waiting)

    def _make_room(self) -> bool:
        """Close the oldest connection still sending its head; False if there is none."""
        if not self._waiting:
            return False
        self._drop(next(iter(self._waiting.values())))
        return True

    def _read(self, waiting: _Waiting) -> None:
        """Take what the client sent (its TLS handshake first); hand a whole head to the workers."""
        sock = waiting.sock
        try:
            if not waiting.handshaken:
                sock.do_handshake()  # type: ignore[attr-defined]
                waiting.handshaken = True
            while len(waiting.head) <= self.limits.max_head_bytes:
                chunk = sock.recv(4096)
                if not chunk:  # the client went away
                    self._drop(waiting)
                    return
                waiting.head += chunk
                end = _END_OF_HEAD.search(waiting.head)
                if end is not None and end.end() <= self.limits.max_head_bytes:
                    self._selector.unregister(sock)
                    del self._waiting[sock]
                    with self._lock:
                        self._answering += 1
                    self._ready.put(waiting)
                    return
            # the head is too long; best effort: the socket does not block, and is closed next
            sock.send(b"HTTP/1.0 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n")
            self._drop(waiting)
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE, waiting)
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            self._selector.modify(sock, selectors.EVENT_READ, waiting)
        except OSError:  # a failed handshake, a reset
            log.debug("/metrics: a connection from %s failed", waiting.address, exc_info=True)
            self._drop(waiting)

    def _drop(self, waiting: _Waiting) -> None:
        self._selector.unregister(waiting.sock)
        del self._waiting[waiting.sock]
        waiting.sock.close()

    def _work(self) -> None:
        """Answer whole requests into memory; `serve_forever` sends the answers."""
        while (waiting := self._ready.get()) is not None:
            try:
                waiting.sock.settimeout(self.limits.timeout)
                answer = _Handler(waiting.sock, waiting.address, self, bytes(waiting.head)).answer
            except Exception:
                self.handle_error(waiting.sock, waiting.address)
                self.shutdown_request(waiting.sock)
                with self._lock:
                    self._answering -= 1
                continue
            waiting.sock.setblocking(False)
            self._answers.put(_Sending(waiting.sock, waiting.address, answer, 0.0))
            with contextlib.suppress(BlockingIOError):  # wake-ups pending already: it takes this one too
                self._wake.send(b"\0")

    def _take_answers(self) -> None:
        """Start sending the answers the workers wrote, dropping the answers whose clients read
        nothing for longest while all held would be over `max_buffered_bytes`."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_read.recv(4096):
                pass
        while True:
            try:
                sending = self._answers.get_nowait()
            except queue.Empty:
                return
            while self._sending and self._buffered + len(sending.left) > self.limits.max_buffered_bytes:
                self._finish(next(iter(self._sending.values())))
            sending.deadline = time.monotonic() + self.limits.timeout
            self._sending[sending.sock] = sending
            self._buffered += len(sending.left)
            self._selector.register(sending.sock, selectors.EVENT_WRITE, sending)
            # what the kernel takes now: later progress is the client's reading alone, so the
            # order of `_sending` puts the answers nobody reads first, in the order they came
            self._send(sending)

    def _send(self, sending: _Sending) -> None:
        """Send what the kernel takes of the answer; a client that read some has `timeout` more."""
        sock = sending.sock
        try:
            sent = sock.send(sending.left[:_CHUNK])
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, sending)
            return
        except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            self._selector.modify(sock, selectors.EVENT_WRITE, sending)
            return
        except OSError:  # a reset: the client went away
            log.debug("/metrics: sending to %s failed", sending.address, exc_info=True)
            self._finish(sending)
            return
        sending.left = sending.left[sent:]
        self._buffered -= sent
        if not sending.left:
            self._finish(sending)
            return
        del self._sending[sock]  # re-inserted last: the dict's order is of deadlines
        sending.deadline = time.monotonic() + self.limits.timeout
        self._sending[sock] = sending
        self._selector.modify(sock, selectors.EVENT_WRITE, sending)

    def _finish(self, sending: _Sending) -> None:
        """Close a connection whose answer was sent, or is dropped."""
        self._selector.unregister(sending.sock)
        del self._sending[sending.sock]
        self._buffered -= len(sending.left)
        self.shutdown_request(sending.sock)
        with self._lock:
            self._answering -= 1


def start_metrics_server(
    host: str,
    port: int,
    app,
    *,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    auth: PasswordCheck | None = None,
    limits: HttpLimits = HttpLimits(),
) -> tuple[MetricsServer, threading.Thread]:
    """Serve the WSGI `app` within `limits`, with TLS and basic auth if given."""
    context = None
    if certfile is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise AuthConfigError(
                f"cannot load the /metrics TLS certificate {certfile} / key {keyfile}: {exc}"
            ) from None
    httpd = MetricsServer((host, port), limits, context)
    httpd.set_app(app if auth is None else BasicAuth(app, auth))
    thread = threading.Thread(target=httpd.serve_forever, name="thermoscope-metrics", daemon=True)
    thread.start()
    return httpd, thread
