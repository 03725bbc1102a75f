"""Make the compose collector's credentials once: the agents' token and Prometheus' password.

The collector listens on every interface of its container, so it refuses to start without a
tokens file (gRPC) and a basic-auth users file (/metrics). compose.yaml runs this script before
the collector and Prometheus, in the collector's image, on the named volume they share
(`python credentials.py /etc/thermoscope`), so `docker compose up` works with nothing to prepare
and no secret is written in the repository. It writes, in DIRECTORY:

- `token`: a random bearer token, for the agents (`THERMOSCOPE_TOKEN`);
- `tokens`: the collector's `--tokens` file, holding that token;
- `scrape-password`: a random password for Prometheus' `basic_auth.password_file`;
- `metrics-users`: the collector's `--metrics-basic-auth` file: `prometheus:BCRYPT` of it.

A pair whose files exist is kept (a second `up` must not change the token agents were given);
one that is incomplete is made anew. Every file is readable by this user only, except
`scrape-password`, which Prometheus reads as another user (`nobody`).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from thermoscope.collector.exposition.passwords import hash_password

#: The user Prometheus logs in as (compose/prometheus.yml's `basic_auth.username`).
SCRAPE_USER = "prometheus"


def write(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path` with `mode`, whole or not at all (a rename)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(partial, path)


def make(directory: Path) -> list[str]:
    """Make the files of every incomplete pair in `directory`; the names of those written."""
    written = []
    if not ((directory / "token").exists() and (directory / "tokens").exists()):
        token = secrets.token_urlsafe(32)
        write(directory / "token", token + "\n", 0o600)
        write(directory / "tokens", f"{token}\n", 0o600)
        written += ["token", "tokens"]
    if not ((directory / "scrape-password").exists() and (directory / "metrics-users").exists()):
        password = secrets.token_urlsafe(32)
        write(directory / "scrape-password", password, 0o644)
        write(directory / "metrics-users", f"{SCRAPE_USER}:{hash_password(password)}\n", 0o600)
        written += ["scrape-password", "metrics-users"]
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python credentials.py DIRECTORY", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    written = make(directory)
    print(f"{directory}: {'made ' + ', '.join(written) if written else 'credentials kept'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
