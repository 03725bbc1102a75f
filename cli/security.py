"""The security flags that `thermoscope collector` and `thermoscope attach` share, and
`thermoscope hash-password`, which makes the lines of a `--metrics-basic-auth` file.

The flags build a `collector.security.Security`; what each one guards, and the refusal to
serve a non-loopback address unprotected, are the collector's (`collector.security`).
"""

from __future__ import annotations

import argparse
import getpass

from thermoscope.collector.credentials import AuthConfigError
from thermoscope.collector.exposition.passwords import hash_password
from thermoscope.collector.ingest.grpc_auth import MIN_TOKEN_CHARS
from thermoscope.collector.security import Security


def add_arguments(command: argparse.ArgumentParser) -> None:
    """The flags of `Security`, as one group of `command` (`collector`, `attach`)."""
    g = command.add_argument_group(
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
        help="/metrics asks for basic auth; lines `USER:BCRYPT_HASH` (thermoscope hash-password USER "
        "or htpasswd -nB USER prints one; `USER:pbkdf2_sha256$...` lines of earlier versions still work)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without the protection above",
    )


def from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Security:
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


def add_password_command(sub: argparse._SubParsersAction) -> None:
    """The `hash-password` command."""
    p = sub.add_parser(
        "hash-password",
        help="ask for a password and print a line of a --metrics-basic-auth file",
        description="Prints `USER:$2b$10$...` (bcrypt, as Prometheus' web config and htpasswd -B use); "
        "the password, at most 72 bytes, is read from the terminal without echo (from stdin when there "
        "is none).",
    )
    p.add_argument("user", help="the user name Prometheus (or any scraper) logs in with")


def hash_password_line(args: argparse.Namespace) -> int:
    """`thermoscope hash-password USER`: print the user's line of a basic-auth file."""
    try:
        hashed = hash_password(getpass.getpass(f"password for {args.user}: "))
    except ValueError as exc:  # longer than bcrypt reads
        raise SystemExit(f"thermoscope hash-password: {exc}") from None
    print(f"{args.user}:{hashed}")
    return 0
