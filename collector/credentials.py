"""The collector's security files (tokens, keys, certificates, password hashes): the one reader,
and the one error for a file, or a combination of them, that cannot be used.

Both sides of the collector's security read through it (`grpc_auth`: tokens and TLS,
`passwords`: basic-auth users) and so does the Ray actor's packing (`actor.PackedSecurity`),
so every such failure names the file and why, the same way.
"""

from __future__ import annotations

from pathlib import Path


class AuthConfigError(ValueError):
    """A token, password or TLS file that cannot be used; the message says which line and why."""


def read_file(path: str | Path, what: str) -> bytes:
    """The file's bytes; AuthConfigError names `what` it is and why it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
