"""Who may stream to the collector, and who may read `/metrics`.

Bearer tokens (`--tokens FILE`). Each line of the file is `TOKEN [JOB_PREFIX]`; `#` starts a
comment; blank lines are skipped. A token with a prefix may only stream jobs whose `job_id`
starts with it, so one team's agents cannot write into another team's jobs; a token without
one may stream any job. Tokens are at least `MIN_TOKEN_CHARS` characters and unique; a file
that breaks these rules stops the collector at startup with the line that is wrong.

`TokenInterceptor` (a `grpc.aio.ServerInterceptor`) guards `thermoscope.v1.Telemetry/Stream`
only: the health service stays open (load balancers and `wait_serving` probe it without a
token). The token travels as `authorization: Bearer <token>` metadata. It is compared with
`hmac.compare_digest` against *every* known token, by their SHA-256 digests (equal lengths, so
neither which token nor its length leaks through timing). A call without a valid token ends
at once with UNAUTHENTICATED, before any message is read, and is counted in
`thermoscope_frames_rejected_total{reason="unauthenticated"}`.

The job binding is checked where the job is known, in the first message (the hello). The
interceptor hands the servicer, per call, a request deserializer that turns a hello for a job
outside the token's prefix into a `BadBytes("forbidden_job", ...)`: the servicer then refuses it
like any other bad message (PERMISSION_DENIED, counted as `reason="forbidden_job"`), so no
principal has to travel between the interceptor and the servicer (no contextvar: grpc.aio does
not promise the interceptor and the handler share a context).

`/metrics` basic auth (`--metrics-basic-auth FILE`): lines `USER:pbkdf2_sha256$ITERATIONS$SALT$HEX`
(what `hash_password` prints; `python -m thermoscope.collector.auth USER` asks for a password
and prints the line). PBKDF2 from the standard library: salted and slow, no bcrypt needed.
`start_metrics_server` serves the collector's WSGI app (`export.metrics_app`), wrapped in
`BasicAuth` (a 401 with `WWW-Authenticate` without valid credentials) if users are given, with
TLS if a certificate is: one server and one handler for plain and guarded `/metrics` alike.

`check_exposure` is the refusal to listen on a non-loopback address unprotected.
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
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client.exposition import ThreadingWSGIServer

from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.contract import STREAM_METHOD, is_loopback

from .server import BadBytes

log = logging.getLogger("thermoscope.collector")

MIN_TOKEN_CHARS = 16
PBKDF2_ITERATIONS = 200_000


class AuthConfigError(ValueError):
    """A token, password or TLS file that cannot be used; the message says which line and why."""


def read_file(path: str | Path, what: str) -> bytes:
    """The file's bytes; AuthConfigError names `what` it is and why it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


class InsecureError(ValueError):
    """The collector would listen on a non-loopback address unprotected (see `check_exposure`)."""


# -- tokens -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """An authenticated agent: which line of the tokens file, and the jobs it may stream."""

    line: int
    job_prefix: str  # "" : any job

    def may_stream(self, job_id: str) -> bool:
        return job_id.startswith(self.job_prefix)


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class TokenTable:
    """The known tokens (kept as SHA-256 digests) and their job prefixes."""

    def __init__(self, entries: Iterable[tuple[str, str]], *, lines: Iterable[int] | None = None) -> None:
        """`entries`: (token, job_prefix) pairs, prefix "" for any job; `lines`: where each came from."""
        entries = list(entries)
        numbers = list(lines) if lines is not None else list(range(1, len(entries) + 1))
        self._entries: list[tuple[bytes, Principal]] = []
        seen: dict[bytes, int] = {}
        for number, (token, prefix) in zip(numbers, entries, strict=True):
            if len(token) < MIN_TOKEN_CHARS:
                raise AuthConfigError(f"line {number}: a token has at least {MIN_TOKEN_CHARS} characters")
            digest = _digest(token)
            if digest in seen:
                raise AuthConfigError(f"line {number}: the same token as line {seen[digest]}")
            seen[digest] = number
            self._entries.append((digest, Principal(number, prefix)))
        if not self._entries:
            raise AuthConfigError("no tokens (lines: `TOKEN [JOB_PREFIX]`)")

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Read a tokens file (`TOKEN [JOB_PREFIX]` lines); AuthConfigError names the bad line."""
        text = read_file(path, "tokens file").decode()
        entries, lines = [], []
        for number, raw in enumerate(text.splitlines(), 1):
            fields = raw.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) > 2:
                raise AuthConfigError(
                    f"tokens file {path} line {number}: expected `TOKEN [JOB_PREFIX]`, "
                    f"got {len(fields)} fields"
                )
            entries.append((fields[0], fields[1] if len(fields) == 2 else ""))
            lines.append(number)
        try:
            return cls(entries, lines=lines)
        except AuthConfigError as exc:
            raise AuthConfigError(f"tokens file {path}: {exc}") from None

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, token: str | bytes) -> Principal | None:
        """The principal of `token`, or None; compares with every entry (constant time)."""
        presented = _digest(token)
        found = None
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, presented) and found is None:
                found = principal
        return found


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for key, val in metadata or ():
        if key.lower() == "authorization":
            text = val.decode(errors="replace") if isinstance(val, bytes) else val
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a Telemetry stream through with a known bearer token; binds it to the token's jobs."""

    def __init__(self, tokens: TokenTable, rejected: Counter[str]) -> None:
        """`rejected`: the servicer's counter behind `thermoscope_frames_rejected_total{reason}`."""
        self.tokens = tokens
        self.rejected = rejected

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], object],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if details.method != STREAM_METHOD:
            return await continuation(details)  # health and unknown methods: as before
        token = bearer(details.invocation_metadata)
        principal = None if token is None else self.tokens.match(token)
        handler = await continuation(details)
        if principal is None:
            why = "no bearer token" if token is None else "unknown bearer token"
            return grpc.stream_stream_rpc_method_handler(self._refuse(why))
        if handler is None or not principal.job_prefix:
            return handler
        return grpc.stream_stream_rpc_method_handler(
            handler.stream_stream,
            request_deserializer=_bound(handler.request_deserializer, principal),
            response_serializer=handler.response_serializer,
        )

    def _refuse(self, why: str):
        rejected = self.rejected

        async def refuse(requests, context: grpc.aio.ServicerContext):
            rejected["unauthenticated"] += 1
            log.warning("refused a stream from %s: %s", context.peer(), why)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"{why} (send `authorization: Bearer TOKEN`)"
            )
            yield  # pragma: no cover - abort raises; this makes it a stream handler

        return refuse


def _bound(decode: Callable[[bytes], object], principal: Principal) -> Callable[[bytes], object]:
    """`decode` that refuses a hello for a job outside the principal's prefix."""

    def bound(data: bytes) -> object:
        msg = decode(data)
        if isinstance(msg, pb.AgentMessage) and msg.HasField("hello"):
            job_id = msg.hello.job_id
            if not principal.may_stream(job_id):
                return BadBytes(
                    "forbidden_job",
                    f"the token (tokens file line {principal.line}) may stream only jobs starting "
                    f"with {principal.job_prefix!r}, not {job_id!r}",
                )
        return msg

    return bound


# -- TLS ----------------------------------------------------------------------------------------------


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None):
    """gRPC server credentials; with `client_ca`, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(read_file(key, "TLS key"), read_file(cert, "TLS certificate"))],
        root_certificates=None if client_ca is None else read_file(client_ca, "client CA"),
        require_client_auth=client_ca is not None,
    )


# -- /metrics basic auth --------------------------------------------------------------------------------


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
                    "(python -m thermoscope.collector.auth USER prints one)"
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


# -- exposure -----------------------------------------------------------------------------------------


def check_exposure(
    grpc_host: str,
    metrics_host: str,
    *,
    tokens: bool,
    grpc_tls: bool,
    metrics_tls: bool,
    metrics_auth: bool,
    insecure: bool,
) -> None:
    """Refuse (InsecureError, saying why and which flag) to serve a non-loopback address unprotected.

    gRPC needs a token file or TLS; /metrics needs TLS or basic auth; `insecure` allows either.
    """
    if insecure:
        return
    problems = []
    if not is_loopback(grpc_host) and not (tokens or grpc_tls):
        problems.append(
            f"gRPC would listen on {grpc_host}, which is not loopback, with neither a token file nor "
            "TLS: anyone who reaches it could write into any job (give --tokens FILE and/or "
            "--tls-cert/--tls-key)"
        )
    if not is_loopback(metrics_host) and not (metrics_tls or metrics_auth):
        problems.append(
            f"/metrics would listen on {metrics_host}, which is not loopback, with neither TLS nor "
            "basic auth (give --metrics-tls-cert/--metrics-tls-key and/or --metrics-basic-auth FILE)"
        )
    if problems:
        raise InsecureError(
            "refusing to start: " + "; ".join(problems) + ". To serve unprotected anyway, pass --insecure."
        )


# -- the collector's settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class Security:
    """How the collector authenticates: `Collector(security=...)`, the CLI's flags, the Ray actor.

    `tokens`: the tokens file (agents need a bearer token); `tls_cert`/`tls_key`: gRPC serves
    TLS; `tls_client_ca`: and requires client certificates signed by this CA (mutual TLS);
    `metrics_tls_cert`/`metrics_tls_key`: /metrics serves HTTPS; `metrics_basic_auth`: the
    basic-auth users file of /metrics; `insecure`: allow a non-loopback address unprotected.
    Paths are read when the collector is built, so a missing or malformed file fails at startup,
    not at the first agent (for the Ray actor they are read on the driver and their contents
    shipped to it, see `actor.PackedSecurity`).
    """

    tokens: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_client_ca: str | Path | None = None
    metrics_tls_cert: str | Path | None = None
    metrics_tls_key: str | Path | None = None
    metrics_basic_auth: str | Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        for cert, key, flag in (
            (self.tls_cert, self.tls_key, "--tls-cert and --tls-key"),
            (self.metrics_tls_cert, self.metrics_tls_key, "--metrics-tls-cert and --metrics-tls-key"),
        ):
            if (cert is None) != (key is None):
                raise AuthConfigError(f"{flag} go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise AuthConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    def load(self, grpc_host: str, metrics_host: str) -> Guard:
        """Check the exposure of both addresses, then read every file (AuthConfigError, InsecureError)."""
        check_exposure(
            grpc_host,
            metrics_host,
            tokens=self.tokens is not None,
            grpc_tls=self.tls_cert is not None,
            metrics_tls=self.metrics_tls_cert is not None,
            metrics_auth=self.metrics_basic_auth is not None,
            insecure=self.insecure,
        )
        return Guard(
            self,
            None if self.tokens is None else TokenTable.load(self.tokens),
            None
            if self.tls_cert is None
            else server_credentials(self.tls_cert, self.tls_key, self.tls_client_ca),  # type: ignore[arg-type]
            None if self.metrics_basic_auth is None else BasicAuthUsers.load(self.metrics_basic_auth),
        )


@dataclass(frozen=True)
class Guard:
    """A loaded `Security`: what `Collector.start` hooks into the gRPC server and /metrics."""

    security: Security
    tokens: TokenTable | None
    credentials: grpc.ServerCredentials | None
    users: BasicAuthUsers | None

    @property
    def metrics_scheme(self) -> str:
        return "https" if self.security.metrics_tls_cert is not None else "http"

    def interceptors(self, rejected: Counter[str]) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.tokens is None else [TokenInterceptor(self.tokens, rejected)]

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.credentials)

    def start_metrics(self, host: str, port: int, app):
        """(server, thread) serving the WSGI `app` (`/metrics`), guarded as configured."""
        return start_metrics_server(
            host,
            port,
            app,
            certfile=self.security.metrics_tls_cert,
            keyfile=self.security.metrics_tls_key,
            users=self.users,
        )


# -- the command line ----------------------------------------------------------------------------


def add_arguments(c) -> None:
    """The `thermoscope collector` flags of `Security`."""
    g = c.add_argument_group(
        "security",
        "A collector listening on a non-loopback address needs --tokens or --tls-cert/--tls-key (gRPC) "
        "and --metrics-tls-cert/--metrics-tls-key or --metrics-basic-auth (/metrics), unless --insecure.",
    )
    g.add_argument(
        "--tokens",
        metavar="FILE",
        help="agents must present a bearer token listed here; lines `TOKEN [JOB_PREFIX]` (a token with "
        f"a prefix may stream only jobs whose id starts with it; tokens >= {MIN_TOKEN_CHARS} characters; "
        "# comments). Agents: Monitor(token=...) or $THERMOSCOPE_TOKEN / $THERMOSCOPE_TOKEN_FILE",
    )
    g.add_argument("--tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate (chain)")
    g.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    g.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: agents must present a client certificate signed by this CA",
    )
    g.add_argument(
        "--metrics-tls-cert", metavar="PEM", help="serve /metrics over HTTPS with this certificate"
    )
    g.add_argument("--metrics-tls-key", metavar="PEM", help="the private key of --metrics-tls-cert")
    g.add_argument(
        "--metrics-basic-auth",
        metavar="FILE",
        help="/metrics asks for basic auth; lines `USER:pbkdf2_sha256$ITERATIONS$SALT$HEX` "
        "(python -m thermoscope.collector.auth USER prints one)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without the protection above",
    )


def from_args(args, parser) -> Security:
    """The `Security` of the parsed flags (a bad combination: `parser.error`)."""
    try:
        return Security(
            tokens=args.tokens,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            metrics_tls_cert=args.metrics_tls_cert,
            metrics_tls_key=args.metrics_tls_key,
            metrics_basic_auth=args.metrics_basic_auth,
            insecure=args.insecure,
        )
    except AuthConfigError as exc:
        parser.error(f"{args.command}: {exc}")
        raise  # parser.error exits


if __name__ == "__main__":
    import getpass
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m thermoscope.collector.auth USER  (prints a --metrics-basic-auth line)")
    print(f"{sys.argv[1]}:{hash_password(getpass.getpass(f'password for {sys.argv[1]}: '))}")
