"""`/metrics` over HTTP(S): the server, and the basic auth it may ask for.

The server. One thread (`MetricsServer.serve_forever`) accepts connections and reads their
request heads without blocking (the TLS handshake too); a connection whose head is not whole
within `HttpLimits.timeout` is closed, and only a whole request goes to one of a few worker
threads, which answer it with wsgiref's handler. So an idle or slow client holds a socket and a
few bytes, never a thread: before, each connection had a thread with no timeout, and 1,012
half-sent requests took every file descriptor of a collector (its limit was 1,024) and its
scrapes failed. Connections are bounded (`HttpLimits.max_connections`): beyond it the oldest
one still sending its head is closed to make room, so a scrape gets in however many idle
clients there are (docs/security.md has the measurements).

Basic auth (`--metrics-basic-auth FILE`): lines `USER:HASH`, the HASH bcrypt (`$2b$`/`$2y$`/`$2a$`,
what `thermoscope hash-password USER` and `htpasswd -nB USER` print, and what Prometheus' own
web config takes) or `pbkdf2_sha256$ITERATIONS$SALT$HEX` (what earlier versions printed; still
read). A hash costs ~60 ms of CPU (bcrypt cost 10, PBKDF2 200,000 rounds) by design, so
`PasswordCheck` hashes as little as it can: a verified (user, password) pair is remembered (by a
keyed hash of the pair, never the password) and not hashed again, and each client address may
have `FAILURE_BURST` wrong passwords hashed, then one per `1 / FAILURE_REFILL_PER_S` seconds;
beyond that it is answered 429 at once. Before, every wrong password was hashed: 100 in a row
cost the collector 6.18 CPU seconds, now 0.35 (tests/bench/bench_metrics_http.py). What it
refused and hashed is counted in /metrics (`thermoscope_metrics_auth_failures_total{reason}`,
`thermoscope_metrics_password_checks_total`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import math
import os
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import bcrypt
from prometheus_client.core import CounterMetricFamily

from .credentials import AuthConfigError, read_file

log = logging.getLogger("thermoscope.collector")

#: The cost `hash_password` writes: ~60 ms a hash on this project's machine, as PBKDF2's 200,000 rounds were.
BCRYPT_ROUNDS = 10
#: bcrypt reads no more of a password than this; longer ones are refused, not cut.
BCRYPT_MAX_BYTES = 72
#: Wrong passwords a client address may have hashed at once, and how many more per second.
FAILURE_BURST = 5
FAILURE_REFILL_PER_S = 0.2
#: Verified (user, password) pairs remembered, and client addresses whose failures are tracked.
VERIFIED_PAIRS = 64
TRACKED_ADDRESSES = 4096
#: What `PasswordCheck.admit` says; all but OK are the reasons of `thermoscope_metrics_auth_failures_total`.
OK, MISSING, WRONG, RATE_LIMITED = "ok", "missing", "wrong", "rate_limited"

_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


# -- passwords ----------------------------------------------------------------------------------------


def hash_password(password: str, *, rounds: int = BCRYPT_ROUNDS) -> str:
    """A bcrypt hash (`$2b$...`): the part after `USER:` of a basic-auth file line.

    ValueError for a password longer than bcrypt reads (`BCRYPT_MAX_BYTES`), rather than a hash
    that any password with the same first 72 bytes would match."""
    secret = password.encode()
    if len(secret) > BCRYPT_MAX_BYTES:
        raise ValueError(f"a password of at most {BCRYPT_MAX_BYTES} bytes, please (bcrypt reads no more)")
    return bcrypt.hashpw(secret, bcrypt.gensalt(rounds)).decode()


@dataclass(frozen=True)
class _Bcrypt:
    hashed: bytes

    def verify(self, password: bytes) -> bool:
        return len(password) <= BCRYPT_MAX_BYTES and bcrypt.checkpw(password, self.hashed)


@dataclass(frozen=True)
class _Pbkdf2:
    iterations: int
    salt: bytes
    digest: bytes

    def verify(self, password: bytes) -> bool:
        got = hashlib.pbkdf2_hmac("sha256", password, self.salt, self.iterations)
        return hmac.compare_digest(got, self.digest)


def _parse_hash(text: str) -> _Bcrypt | _Pbkdf2:
    """The hash of a basic-auth line (ValueError if it is neither format)."""
    if _BCRYPT.fullmatch(text):
        return _Bcrypt(text.encode())
    kind, iterations, salt, digest = text.split("$")  # ValueError unless four fields
    if kind != "pbkdf2_sha256":
        raise ValueError(kind)
    return _Pbkdf2(int(iterations), bytes.fromhex(salt), bytes.fromhex(digest))


class BasicAuthUsers:
    """The users of a basic-auth file: `USER:HASH` lines (bcrypt or PBKDF2), `#` comments."""

    def __init__(self, users: dict[str, str]) -> None:
        """`users`: user -> hash (bcrypt, or `pbkdf2_sha256$ITERATIONS$SALT$HEX`)."""
        self._users: dict[str, _Bcrypt | _Pbkdf2] = {}
        for user, text in users.items():
            try:
                self._users[user] = _parse_hash(text)
            except ValueError:
                raise AuthConfigError(
                    f"user {user!r}: expected a bcrypt hash ($2b$, $2y$ or $2a$, 60 characters) or "
                    "pbkdf2_sha256$ITERATIONS$SALT_HEX$DIGEST_HEX (thermoscope hash-password USER "
                    "prints one)"
                ) from None
        if not self._users:
            raise AuthConfigError("no users")
        self._dummy = next(iter(self._users.values()))

    @classmethod
    def load(cls, path: str | Path) -> BasicAuthUsers:
        text = read_file(path, "basic-auth file").decode()
        users = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not user or user in users:
                why = "a user appears twice" if user in users else "expected USER:HASH"
                raise AuthConfigError(f"{path} line {number}: {why}")
            users[user] = hashed
        try:
            return cls(users)
        except AuthConfigError as exc:
            raise AuthConfigError(f"{path}: {exc}") from None

    def check(self, user: str, password: str) -> bool:
        """True if the password is the user's; an unknown user costs the same hashing."""
        known = self._users.get(user)
        ok = (known or self._dummy).verify(password.encode())
        return ok and known is not None


def _credentials(header: str) -> tuple[str, str] | None:
    """(user, password) of a basic `Authorization` header, None if it carries none."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class PasswordCheck:
    """Who may read /metrics: the users' hashes, behind a memory of verified pairs and a bucket of
    wrong guesses per client address, so that a hash runs only where it must.

    A scraper with the right password is hashed once, then remembered (up to `VERIFIED_PAIRS`
    pairs, the least recently seen forgotten first) by an HMAC of the pair under a key made at
    start, so the memory holds no password. A pair not remembered costs its address a token
    before it is hashed (given back if it is right): `FAILURE_BURST` tokens, refilled at
    `FAILURE_REFILL_PER_S` a second; an address without one is answered 429 without hashing.
    The last `TRACKED_ADDRESSES` addresses are tracked (one forgotten starts again with a full
    bucket).
    """

    def __init__(self, users: BasicAuthUsers) -> None:
        self.users = users
        self._key = os.urandom(32)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when), oldest first
        self._lock = threading.Lock()  # the HTTP workers check concurrently
        self.checks = 0  # passwords hashed against the users' hashes
        self.failures: Counter[str] = Counter({MISSING: 0, WRONG: 0, RATE_LIMITED: 0})

    def admit(self, header: str, address: str) -> str:
        """`OK`, or why not (`MISSING`, `WRONG`, `RATE_LIMITED`), for an `Authorization` header
        from `address`."""
        pair = _credentials(header)
        if pair is None:
            return self._refuse(MISSING)
        user, password = pair
        secret = user.encode()
        key = hmac.digest(self._key, len(secret).to_bytes(4, "big") + secret + password.encode(), "sha256")
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return OK
            if not self._take(address, 1.0):
                self.failures[RATE_LIMITED] += 1
                return RATE_LIMITED
            self.checks += 1
        ok = self.users.check(user, password)  # outside the lock: this is what costs
        with self._lock:
            if not ok:
                self.failures[WRONG] += 1
                return WRONG
            self._take(address, -1.0)  # a right password costs no token
            self._verified[key] = None
            if len(self._verified) > VERIFIED_PAIRS:
                self._verified.popitem(last=False)
            return OK

    def retry_after(self, address: str) -> int:
        """Whole seconds until `address` may have a password hashed again (at least 1)."""
        with self._lock:
            tokens = self._tokens(address, time.monotonic())
        return max(1, math.ceil((1.0 - tokens) / FAILURE_REFILL_PER_S))

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The counters, as a prometheus_client collector (`Guard.register_metrics`)."""
        failures = CounterMetricFamily(
            "thermoscope_metrics_auth_failures",
            "Requests for /metrics refused by basic auth, by reason: missing (no credentials), wrong "
            "(a password hashed and not the user's), rate_limited (answered 429 without hashing: the "
            "client address had too many wrong passwords).",
            labels=["reason"],
        )
        checks = CounterMetricFamily(
            "thermoscope_metrics_password_checks",
            "Passwords hashed against the basic-auth users' hashes (bcrypt or PBKDF2, ~60 ms of CPU "
            "each); a verified password is remembered, not hashed again.",
        )
        with self._lock:
            for reason, n in sorted(self.failures.items()):
                failures.add_metric([reason], n)
            checks.add_metric([], self.checks)
        yield failures
        yield checks

    def _refuse(self, reason: str) -> str:
        with self._lock:
            self.failures[reason] += 1
        return reason

    def _tokens(self, address: str, now: float) -> float:
        tokens, then = self._buckets.get(address, (FAILURE_BURST, now))
        return min(FAILURE_BURST, tokens + (now - then) * FAILURE_REFILL_PER_S)

    def _take(self, address: str, n: float) -> bool:
        """Take `n` tokens (give back, if negative) from `address`'s bucket; False if it has too few."""
        now = time.monotonic()
        tokens = self._tokens(address, now)
        self._buckets.pop(address, None)  # re-inserted last: the dict's order is the addresses' recency
        ok = tokens >= n
        self._buckets[address] = (min(FAILURE_BURST, tokens - n) if ok else tokens, now)
        if len(self._buckets) > TRACKED_ADDRESSES:
            del self._buckets[next(iter(self._buckets))]
        return ok


class BasicAuth:
    """WSGI middleware: the app's answer for admitted requests; else 401 (with `WWW-Authenticate`),
    or 429 (with `Retry-After`) for an address with too many wrong passwords."""

    def __init__(self, app, check: PasswordCheck, realm: str = "thermoscope") -> None:
        self.app, self.check, self.realm = app, check, realm

    def __call__(self, environ, start_response):
        address = environ.get("REMOTE_ADDR", "")
        verdict = self.check.admit(environ.get("HTTP_AUTHORIZATION", ""), address)
        if verdict == OK:
            return self.app(environ, start_response)
        if verdict == RATE_LIMITED:
            retry = str(self.check.retry_after(address))
            start_response("429 Too Many Requests", [("Retry-After", retry), ("Content-Type", "text/plain")])
            return [b"429 Too Many Requests: too many wrong passwords from this address\n"]
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", f'Basic realm="{self.realm}"'), ("Content-Type", "text/plain")],
        )
        return [b"401 Unauthorized\n"]


# -- the server ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on what /metrics clients may make the collector hold.

    `timeout`: seconds a client has from connecting to the end of its request head (a TLS
    handshake included), and then for each read and write of its answer; `max_connections`:
    connections open at once (beyond it the oldest still sending its head is closed to make room;
    if every one is a whole request, the new connection is closed at once); `workers`: threads
    answering whole requests (more wait their turn); `max_head_bytes`: the longest request head
    (a Prometheus scrape's is under 1 KiB; a longer one is answered 431 and closed).
    """

    timeout: float = 5.0
    max_connections: int = 256
    workers: int = 8
    max_head_bytes: int = 16 << 10

    def __post_init__(self) -> None:
        for name in ("timeout", "max_connections", "workers", "max_head_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class _Waiting:
    """A connection whose request head has not all arrived."""

    __slots__ = ("address", "deadline", "handshaken", "head", "sock")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock, self.address, self.deadline = sock, address, deadline
        self.head = bytearray()
        self.handshaken = not isinstance(sock, ssl.SSLSocket)


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
    """wsgiref's handler of one request, reading first the head the server already read."""

    def __init__(self, request, client_address, server, head: bytes) -> None:
        self._head = head
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_Replayed(self._head, self.rfile))

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
        try:
            while not self._stop.is_set():
                wait = poll_interval
                if self._waiting:
                    first = next(iter(self._waiting.values()))
                    wait = min(wait, max(0.0, first.deadline - time.monotonic()))
                for key, _ in self._selector.select(wait):
                    if key.fileobj is self.socket:
                        self._accept()
                    elif key.data.sock in self._waiting:  # not closed by `_accept` meanwhile
                        self._read(key.data)
                now = time.monotonic()
                while self._waiting and (first := next(iter(self._waiting.values()))).deadline <= now:
                    self._drop(first)
        finally:
            self._selector.unregister(self.socket)
            for waiting in list(self._waiting.values()):
                self._drop(waiting)
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
        while (waiting := self._ready.get()) is not None:
            try:
                waiting.sock.settimeout(self.limits.timeout)
                _Handler(waiting.sock, waiting.address, self, bytes(waiting.head))
            except Exception:
                self.handle_error(waiting.sock, waiting.address)
            finally:
                self.shutdown_request(waiting.sock)
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
