"""`/metrics` over HTTP(S): the server, and the basic auth it may ask for.

Basic auth (`--metrics-basic-auth FILE`): lines `USER:pbkdf2_sha256$ITERATIONS$SALT$HEX` (what
`hash_password` makes; `thermoscope hash-password USER` asks for a password and prints the
line). PBKDF2 from the standard library: salted and slow, no bcrypt needed.
`start_metrics_server` serves the collector's WSGI app (`export.metrics_app`), wrapped in
`BasicAuth` (a 401 with `WWW-Authenticate` without valid credentials) if users are given, with
TLS if a certificate is (`--metrics-tls-cert/--metrics-tls-key`): one server and one handler
for plain and guarded `/metrics` alike.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import ThreadingWSGIServer

from .credentials import AuthConfigError, read_file

log = logging.getLogger("thermoscope.collector")

PBKDF2_ITERATIONS = 200_000


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """`pbkdf2_sha256$ITERATIONS$SALT$HEX`: the part after `USER:` of a basic-auth file line."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


@dataclass(frozen=True)
class _Hash:
    iterations: int
    salt: bytes
    digest: bytes

    def verify(self, password: str) -> bool:
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, self.iterations)
        return hmac.compare_digest(got, self.digest)


class BasicAuthUsers:
    """The users of a basic-auth file: `USER:pbkdf2_sha256$ITERATIONS$SALT$HEX` lines, `#` comments."""

    def __init__(self, users: dict[str, str]) -> None:
        """`users`: user -> `hash_password` string."""
        self._users: dict[str, _Hash] = {}
        for user, text in users.items():
            parts = text.split("$")
            try:
                if len(parts) != 4 or parts[0] != "pbkdf2_sha256":
                    raise ValueError
                self._users[user] = _Hash(int(parts[1]), bytes.fromhex(parts[2]), bytes.fromhex(parts[3]))
            except ValueError:
                raise AuthConfigError(
                    f"user {user!r}: expected pbkdf2_sha256$ITERATIONS$SALT_HEX$DIGEST_HEX "
                    "(thermoscope hash-password USER prints one)"
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
        ok = (known or self._dummy).verify(password)
        return ok and known is not None


class BasicAuth:
    """WSGI middleware: 401 unless the request carries valid basic-auth credentials."""

    def __init__(self, app, users: BasicAuthUsers, realm: str = "thermoscope") -> None:
        self.app, self.users, self.realm = app, users, realm

    def __call__(self, environ, start_response):
        if self._authorized(environ.get("HTTP_AUTHORIZATION", "")):
            return self.app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", f'Basic realm="{self.realm}"'), ("Content-Type", "text/plain")],
        )
        return [b"401 Unauthorized\n"]

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return bool(sep) and self.users.check(user, password)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def start_metrics_server(
    host: str,
    port: int,
    app,
    *,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    users: BasicAuthUsers | None = None,
) -> tuple[ThreadingWSGIServer, threading.Thread]:
    """Serve the WSGI `app` on a thread per request, with TLS and basic auth if given."""
    if users is not None:
        app = BasicAuth(app, users)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def handle_error(self, request, client_address) -> None:  # a failed handshake: no traceback
            log.debug("/metrics: a request from %s failed", client_address, exc_info=True)

    httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
    if certfile is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            httpd.server_close()
            raise AuthConfigError(
                f"cannot load the /metrics TLS certificate {certfile} / key {keyfile}: {exc}"
            ) from None
        # the handshake happens in the request's thread, so a client that never completes it
        # holds only its own thread, not the accept loop
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=httpd.serve_forever, name="thermoscope-metrics", daemon=True)
    thread.start()
    return httpd, thread
