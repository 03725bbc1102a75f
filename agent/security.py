"""How an agent proves itself to a collector: a bearer token, TLS, a client certificate.

`channel_security` resolves the agent's settings, each from its `Monitor` argument or else
from the environment (so that a launcher configures every rank without code changes):

- token: `token=` or `$THERMOSCOPE_TOKEN`, or the first line of `$THERMOSCOPE_TOKEN_FILE`;
- TLS: on when a CA or a client certificate is given, or `$THERMOSCOPE_TLS=1` (system roots);
  `tls_root_cert=` / `$THERMOSCOPE_TLS_CA` (PEM of the CA that signed the collector's
  certificate), `tls_client_cert=` + `tls_client_key=` / `$THERMOSCOPE_TLS_CERT` +
  `$THERMOSCOPE_TLS_KEY` (mutual TLS). Each is a path, or the PEM itself as bytes.

With TLS the token is a real gRPC call credential: `composite_channel_credentials(ssl,
access_token_call_credentials(token))` adds `authorization: Bearer <token>` to every call.
Without TLS gRPC refuses call credentials (they would travel in clear text); its
`local_channel_credentials` would carry them, but only to a loopback peer. So on a plaintext
channel the token is sent as the same `authorization` metadata of the call itself, which the
collector checks alike; that is meant for loopback and for networks the operator trusts
(`--insecure`), and the agent warns once when it does so towards a non-loopback target.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from thermoscope.wire.contract import is_loopback

log = logging.getLogger("thermoscope.agent")

Pem = str | os.PathLike | bytes
_warned: set[str] = set()  # targets warned about (once each)


def _pem(value: Pem | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"thermoscope: cannot read the {what} {value}: {exc.strerror or exc}") from None


def _env_token() -> str | None:
    token = os.environ.get("THERMOSCOPE_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("THERMOSCOPE_TOKEN_FILE")
    if not path:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"thermoscope: cannot read $THERMOSCOPE_TOKEN_FILE {path}: {exc.strerror}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ValueError(f"thermoscope: $THERMOSCOPE_TOKEN_FILE {path} is empty")
    return token


def channel_security(
    token: str | None = None,
    tls_root_cert: Pem | None = None,
    tls_client_cert: Pem | None = None,
    tls_client_key: Pem | None = None,
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """(channel credentials, or None for a plaintext channel; metadata for each call)."""
    env = os.environ
    token = token or _env_token()
    root = _pem(tls_root_cert if tls_root_cert is not None else env.get("THERMOSCOPE_TLS_CA"), "TLS CA")
    cert = _pem(
        tls_client_cert if tls_client_cert is not None else env.get("THERMOSCOPE_TLS_CERT"),
        "TLS client certificate",
    )
    key = _pem(
        tls_client_key if tls_client_key is not None else env.get("THERMOSCOPE_TLS_KEY"), "TLS client key"
    )
    if (cert is None) != (key is None):
        raise ValueError("thermoscope: a TLS client certificate and its key go together")
    tls = root is not None or cert is not None or env.get("THERMOSCOPE_TLS", "") not in ("", "0")
    if not tls:
        return None, () if token is None else (("authorization", f"Bearer {token}"),)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    return credentials, ()


def warn_plaintext(target: str, metadata: tuple[tuple[str, str], ...]) -> None:
    """Warn when a token would cross a non-loopback plaintext channel."""
    if not metadata or target in _warned:
        return
    host = target.rpartition(":")[0].strip("[]")
    if not is_loopback(host):
        _warned.add(target)
        log.warning("thermoscope: sending the bearer token to %s without TLS", target)


def refusal_hint(code: grpc.StatusCode) -> str:
    """What to add to the agent's (once-only) log line about a refusal the agent's side must fix.

    UNAUTHENTICATED: the collector wants a token this agent was not given (or not this one).
    Typical for agents that discovered a Ray collector actor started with --tokens, whose
    launcher set no token in the workers' environment; the stream is retried with backoff
    meanwhile (the collector may be restarted with other tokens), so this line is all it says.
    """
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            "; this collector requires a bearer token from its tokens file: give Monitor(token=...) or set "
            "$THERMOSCOPE_TOKEN or $THERMOSCOPE_TOKEN_FILE (Ray workers: the job's runtime_env env_vars). "
            "Until then nothing is delivered (training is unaffected)"
        )
    return ""
