"""How an agent proves itself to a collector: a bearer token, TLS, a client certificate.

`resolve` reads the agent's settings, each from its `Monitor` argument or else from the
environment (so that a launcher configures every rank without code changes), in the training
process, so that a bad path or a lone certificate is an error at `Monitor(...)`:

- token: `token=` or `$THERMOSCOPE_TOKEN`, or the first line of `$THERMOSCOPE_TOKEN_FILE`;
- TLS: on when a CA or a client certificate is given, or `$THERMOSCOPE_TLS=1` (system roots);
  `tls_root_cert=` / `$THERMOSCOPE_TLS_CA` (PEM of the CA that signed the collector's
  certificate), `tls_client_cert=` + `tls_client_key=` / `$THERMOSCOPE_TLS_CERT` +
  `$THERMOSCOPE_TLS_KEY` (mutual TLS). Each is a path, or the PEM itself as bytes.

The result, `Security`, is plain data: the training process never imports gRPC (its relay
process does, `agent/relay.py`), and `Security.to_json` carries it there. The relay turns it
into gRPC credentials (`agent/link.py`): with TLS the token is a real gRPC call credential
(`authorization: Bearer <token>` on every call); without TLS gRPC refuses call credentials
(they would travel in clear text), so on a plaintext channel the token is sent as the same
`authorization` metadata of the call itself, which the collector checks alike; that is meant for
loopback and for networks the operator trusts (`--insecure`), and the agent warns once when it
does so towards a non-loopback target.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

Pem = str | os.PathLike | bytes


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


@dataclass(frozen=True)
class Security:
    """What an agent shows a collector: a token, and TLS with its CA and client certificate."""

    token: str | None = None
    tls: bool = False
    root_cert: bytes | None = None  # None with TLS: the system's roots
    client_cert: bytes | None = None
    client_key: bytes | None = None

    def to_json(self) -> dict:
        """Plain JSON values, for the relay process (`from_json` reads them back)."""
        pem = {k: None if v is None else base64.b64encode(v).decode() for k, v in self._pems().items()}
        return {"token": self.token, "tls": self.tls, **pem}

    @classmethod
    def from_json(cls, data: dict) -> Security:
        pems = {k: None if data[k] is None else base64.b64decode(data[k]) for k in cls()._pems()}
        return cls(token=data["token"], tls=data["tls"], **pems)

    def _pems(self) -> dict[str, bytes | None]:
        return {"root_cert": self.root_cert, "client_cert": self.client_cert, "client_key": self.client_key}

    def __repr__(self) -> str:  # never the token or the key in a log line
        return f"Security(token={'set' if self.token else None}, tls={self.tls})"


def resolve(
    token: str | None = None,
    tls_root_cert: Pem | None = None,
    tls_client_cert: Pem | None = None,
    tls_client_key: Pem | None = None,
) -> Security:
    """The agent's security settings, from the arguments or else the environment; ValueError
    for a file that cannot be read or a certificate without its key."""
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
    return Security(token=token, tls=tls, root_cert=root, client_cert=cert, client_key=key)
