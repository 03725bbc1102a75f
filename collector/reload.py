"""Rotation without a restart: the collector's tokens, /metrics passwords and TLS certificates
read again on SIGHUP, or when one of their files changes (`Rotation.watch` polls them).

A collector runs for weeks beside the jobs it watches, and a restart ends every agent's stream,
so a leaked token, a departed user's password or an expiring certificate is replaced in place.
A reload is all or nothing: every file is read and checked first (the same checks as at start:
`credentials.AuthConfigError` naming the file), and only when all of them load are they swapped
in. A file that cannot be used (half written, a typo) is logged and changes nothing: the
collector goes on with the ones it had, so a bad edit locks nobody out and lets nobody in.

What changes applies to what comes next: a new stream is checked against the new tokens (open
streams, once admitted, go on), a new TLS handshake presents the new certificate (gRPC's
`dynamic_ssl_server_credentials` asks at each; /metrics' context is loaded again), and a scrape is
checked against the new passwords (the memory of verified ones is forgotten, so a removed user
is refused at once). Which files changed is logged, never their contents.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from .credentials import AuthConfigError
from .exposition.passwords import BasicAuthUsers, PasswordCheck
from .ingest.grpc_auth import Principal, TokenTable, check_certificate_and_key, check_client_ca

if TYPE_CHECKING:
    from .security import Security

log = logging.getLogger("thermoscope.collector")

#: Seconds between two looks at the security files' modification times.
WATCH_INTERVAL = 2.0


class LiveTokens:
    """The tokens file's table, replaceable while the gRPC server runs (the token interceptor
    asks it for each new stream)."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def match(self, token: str | bytes) -> Principal | None:
        return self.table.match(token)


class LiveCertificate:
    """gRPC's server certificate (and client CA), replaceable: `credentials` are dynamic, and
    gRPC fetches the configuration at each new handshake."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, client_ca: bytes | None) -> None:
        self.mutual = client_ca is not None
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # gRPC's threads fetch, the event loop replaces
        self._initial = self._configuration(cert_pem, key_pem, client_ca)

    def _configuration(self, cert_pem: bytes, key_pem: bytes, client_ca: bytes | None):
        return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual
        )

    def replace(self, cert_pem: bytes, key_pem: bytes, client_ca: bytes | None) -> None:
        with self._lock:
            self._pending = self._configuration(cert_pem, key_pem, client_ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at a handshake: a new configuration, once, or None (keep the one it has)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


@dataclass
class Loaded:
    """Everything a reload read, checked, before any of it is swapped in."""

    tokens: TokenTable | None
    certificate: tuple[bytes, bytes, bytes | None] | None
    users: BasicAuthUsers | None


class Rotation:
    """Reads the collector's security files again and swaps them into the running servers."""

    def __init__(
        self,
        security: Security,
        tokens: LiveTokens | None,
        certificate: LiveCertificate | None,
        auth: PasswordCheck | None,
    ) -> None:
        self.security = security
        self.tokens = tokens
        self.certificate = certificate
        self.auth = auth
        self.metrics_context: ssl.SSLContext | None = None  # /metrics' TLS, once it serves
        self.reloads = 0  # reloads that took effect
        self._stamps = self._stat()

    def files(self) -> list[Path]:
        """The files a reload reads."""
        s = self.security
        paths = (s.tokens, s.tls_cert, s.tls_key, s.tls_client_ca, s.metrics_tls_cert, s.metrics_tls_key)
        return [Path(p) for p in (*paths, s.metrics_basic_auth) if p is not None]

    def reload(self) -> bool:
        """Read every file, then swap them all in; False (logged, nothing changed) if one fails."""
        try:
            loaded = self._load()
        except AuthConfigError as exc:
            log.error("reload refused, the previous tokens, passwords and certificates stay: %s", exc)
            return False
        if loaded.tokens is not None and self.tokens is not None:
            self.tokens.table = loaded.tokens
        if loaded.certificate is not None and self.certificate is not None:
            self.certificate.replace(*loaded.certificate)
        if loaded.users is not None and self.auth is not None:
            self.auth.replace_users(loaded.users)
        s = self.security
        if self.metrics_context is not None and s.metrics_tls_cert is not None:
            self.metrics_context.load_cert_chain(s.metrics_tls_cert, s.metrics_tls_key)
        self.reloads += 1
        self._stamps = self._stat()
        log.info("reloaded the security files: %s", ", ".join(str(p) for p in self.files()) or "none")
        return True

    def _load(self) -> Loaded:
        s = self.security
        certificate = None
        if s.tls_cert is not None:
            cert_pem, key_pem = check_certificate_and_key(s.tls_cert, s.tls_key)
            ca = None if s.tls_client_ca is None else check_client_ca(s.tls_client_ca)
            certificate = (cert_pem, key_pem, ca)
        if s.metrics_tls_cert is not None:
            check_certificate_and_key(s.metrics_tls_cert, s.metrics_tls_key)
        return Loaded(
            tokens=None if s.tokens is None else TokenTable.load(s.tokens),
            certificate=certificate,
            users=None if s.metrics_basic_auth is None else BasicAuthUsers.load(s.metrics_basic_auth),
        )

    def _stat(self) -> list[tuple[int, int] | None]:
        stamps = []
        for path in self.files():
            try:
                st = path.stat()
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append(None)
        return stamps

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Reload when a file's modification time or size changes, until cancelled (a reload that
        fails is tried again only after the next change). A file that is gone is no change to
        read: the Ray actor's unpacked copies go once loaded, and a file replaced by a rename (as
        a Kubernetes secret is) is never missing."""
        while True:
            await asyncio.sleep(interval)
            stamps = self._stat()
            if None not in stamps and stamps != self._stamps:
                self._stamps = stamps
                log.info("a security file changed: reloading")
                self.reload()
