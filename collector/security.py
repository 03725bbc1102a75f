"""The collector's security as one bundle: `Security` says what guards gRPC and `/metrics`,
`Guard` is it loaded, and `check_exposure` refuses to serve a non-loopback address unprotected.

The parts live beside what they guard: tokens and gRPC's TLS in `grpc_auth`, basic auth and
the HTTP(S) server in `metrics_http`; the files are read through `credentials.read_file`, and
read again without a restart by `reload.Rotation` (SIGHUP, or a file changed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from thermoscope.wire.contract import is_loopback

from .credentials import AuthConfigError
from .exposition.metrics_http import start_metrics_server
from .exposition.passwords import BasicAuthUsers, PasswordCheck
from .ingest.grpc_auth import TokenInterceptor, TokenTable, check_certificate_and_key, check_client_ca
from .reload import LiveCertificate, LiveTokens, Rotation


class InsecureError(ValueError):
    """The collector would listen on a non-loopback address unprotected (see `check_exposure`)."""


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
        certificate = None
        if self.tls_cert is not None:
            cert_pem, key_pem = check_certificate_and_key(self.tls_cert, self.tls_key)  # type: ignore[arg-type]
            ca = None if self.tls_client_ca is None else check_client_ca(self.tls_client_ca)
            certificate = LiveCertificate(cert_pem, key_pem, ca)
        tokens = None if self.tokens is None else LiveTokens(TokenTable.load(self.tokens))
        auth = None
        if self.metrics_basic_auth is not None:
            auth = PasswordCheck(BasicAuthUsers.load(self.metrics_basic_auth))
        return Guard(self, tokens, certificate, auth, Rotation(self, tokens, certificate, auth))


@dataclass(frozen=True)
class Guard:
    """A loaded `Security`: what `Collector.start` hooks into the gRPC server and /metrics."""

    security: Security
    tokens: LiveTokens | None
    certificate: LiveCertificate | None
    auth: PasswordCheck | None
    rotation: Rotation  # reads the files again and swaps them in (SIGHUP, a file changed)

    @property
    def metrics_scheme(self) -> str:
        return "https" if self.security.metrics_tls_cert is not None else "http"

    def interceptors(self, rejected: Counter[str]) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.tokens is None else [TokenInterceptor(self.tokens, rejected)]

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.certificate is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.certificate.credentials())

    def start_metrics(self, host: str, port: int, app):
        """(server, thread) serving the WSGI `app` (`/metrics`), guarded as configured."""
        httpd, thread = start_metrics_server(
            host,
            port,
            app,
            certfile=self.security.metrics_tls_cert,
            keyfile=self.security.metrics_tls_key,
            auth=self.auth,
        )
        if self.security.metrics_tls_cert is not None:
            self.rotation.metrics_context = httpd.socket.context  # loaded again at a reload
        return httpd, thread

    def authorize(self, action: str, job: str | None, token: str | None) -> str:
        """Who may `action` (attach, detach: they pause or resume production jobs) `job` (None:
        every job): a token of the tokens file covering the job (every job: a token bound to
        none), when the collector has one. Returns who, for the log; PermissionError otherwise.
        Without a tokens file anyone who reaches the collector may (its address is the guard:
        loopback, or the Ray cluster's own access control)."""
        if self.tokens is None:
            return "anyone (the collector has no tokens file)"
        principal = None if token is None else self.tokens.match(token)
        what = f"job {job}" if job is not None else "every job"
        if principal is None:
            why = "no token" if token is None else "an unknown token"
            raise PermissionError(
                f"{action} {what}: {why}; it needs a token of the collector's tokens file"
                " ($THERMOSCOPE_TOKEN or $THERMOSCOPE_TOKEN_FILE)"
            )
        if not (principal.may_stream(job) if job is not None else not principal.job_prefix):
            raise PermissionError(
                f"{action} {what}: the token of line {principal.line} covers only jobs"
                f" {principal.job_prefix!r}"
            )
        return f"the token of line {principal.line}"

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add what basic auth refused and hashed to `registry` (rendered at /metrics), if it guards it."""
        if self.auth is not None:
            registry.register(self.auth)
