"""Who may stream to the collector: bearer tokens bound to job prefixes, and gRPC's TLS.

Bearer tokens (`--tokens FILE`). Each line of the file is `TOKEN [JOB_PREFIX]`; a `#` at the
start of a line or of a field (after whitespace) starts a comment, a `#` inside a field is part
of it (a generated token may hold one; cutting it there would silently accept a shorter token);
blank lines are skipped. A token with a prefix may only stream jobs named by the prefix at a name
boundary (`Principal.may_stream`): the prefix itself, or the prefix followed by one of
`SEPARATORS` (`-`, `_`, `.`, `/`, `:`); a prefix that ends in one of them (`teamA-`) needs no
other. So `teamA` streams `teamA` and `teamA-train` but never `teamAx-train`: one team's token
cannot squat another team's names that merely start alike. A token without a prefix may
stream any job. Tokens are at least `MIN_TOKEN_CHARS` characters and unique; a file that breaks
these rules stops the collector at startup with the line that is wrong.

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

TLS on the gRPC port (`--tls-cert/--tls-key`), mutual TLS with a client CA (`--tls-client-ca`):
its credentials are `reload.LiveCertificate`'s, so they rotate without a restart. gRPC takes
any bytes and fails only when it binds ("Failed to bind"), so the files are checked first, with
the standard library (`check_certificate_and_key`, `check_client_ca`): a missing, garbled or
mismatched file stops the collector at startup with an `AuthConfigError` naming the file and
what is wrong with it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.contract import STREAM_METHOD

from ..credentials import AuthConfigError, read_file
from .refusal import BadBytes

log = logging.getLogger("thermoscope.collector")

MIN_TOKEN_CHARS = 16
#: What ends a name's part in a job id: a job prefix matches only up to one of these.
SEPARATORS = "-_./:"


@dataclass(frozen=True)
class Principal:
    """An authenticated agent: which line of the tokens file, and the jobs it may stream."""

    line: int
    job_prefix: str  # "" : any job

    def may_stream(self, job_id: str) -> bool:
        """Whether `job_id` is the prefix, or starts with it at a name boundary (module docstring)."""
        prefix = self.job_prefix
        if not prefix or job_id == prefix:
            return True
        if not job_id.startswith(prefix):
            return False
        return prefix[-1] in SEPARATORS or job_id[len(prefix)] in SEPARATORS


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
            fields = list(itertools.takewhile(lambda field: not field.startswith("#"), raw.split()))
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
                    f"the token (tokens file line {principal.line}) may stream only the jobs of "
                    f"prefix {principal.job_prefix!r} (the prefix, or it and then one of "
                    f"{' '.join(SEPARATORS)}), not {job_id!r}",
                )
        return msg

    return bound


def check_certificate_and_key(cert: str | Path, key: str | Path) -> tuple[bytes, bytes]:
    """The PEM bytes of a certificate (chain) and its private key, checked to load together."""
    cert_pem, key_pem = read_file(cert, "TLS certificate"), read_file(key, "TLS key")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise AuthConfigError(
            f"the TLS certificate {cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )
    if b"PRIVATE KEY-----" not in key_pem:
        raise AuthConfigError(f"the TLS key {key} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)")
    try:  # the empty password: an encrypted key fails here instead of prompting on the terminal
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=b"")
    except (OSError, ssl.SSLError) as exc:
        raise AuthConfigError(
            f"the TLS certificate {cert} does not load with the key {key} (PEM, the key unencrypted "
            f"and matching the certificate): {exc}"
        ) from None
    return cert_pem, key_pem


def check_client_ca(client_ca: str | Path) -> bytes:
    """The PEM bytes of the CA that signs client certificates, checked to hold one."""
    pem = read_file(client_ca, "client CA")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise AuthConfigError(
            f"the client CA {client_ca} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError) as exc:
        raise AuthConfigError(f"the client CA {client_ca} holds no PEM certificate: {exc}") from None
    return pem
