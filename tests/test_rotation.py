"""Tokens, /metrics passwords and TLS certificates rotate without a restart: a collector process
reads them again on SIGHUP, or when a file changes, all or nothing (docs/security.md, "Rotation").

Each test runs a real `thermoscope collector` process on loopback and rewrites its files in place,
as an operator (or a Kubernetes secret update) does.
"""

from __future__ import annotations

import base64
import signal
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from thermoscope.cli.collector_process import CollectorProcess
from thermoscope.collector.exposition.passwords import hash_password
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc

from helpers.metrics import wait_until
from helpers.pki import Pki
from helpers.protocol import frame, hello

OLD, NEW = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
WITHIN = 30.0  # seconds a reload may take on a busy machine (it takes milliseconds)


def streams(target: str, token: str | None = None, root: Path | None = None) -> grpc.StatusCode:
    """The status of one stream (a hello and a frame) with `token` and TLS to `root`, if given."""
    channel = (
        grpc.insecure_channel(target)
        if root is None
        else grpc.secure_channel(target, grpc.ssl_channel_credentials(root.read_bytes()))
    )
    metadata = None if token is None else (("authorization", f"Bearer {token}"),)
    with channel:
        try:
            list(
                pb_grpc.TelemetryStub(channel).Stream(
                    iter([hello("rot"), frame(1, 0)]), metadata=metadata, timeout=10
                )
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def launch(tmp_path: Path, *options: str, tls_root: Path | None = None) -> tuple[CollectorProcess, Path]:
    """A collector process with `options`, serving (over TLS to `tls_root`, if given); and its log file."""
    log = tmp_path / "collector.log"
    collector = CollectorProcess.launch(tmp_path / "events.db", *options, stderr=log.open("w"))
    if tls_root is None:
        collector.wait_serving()
    else:  # the health check speaks plaintext: a stream over TLS says it serves
        wait_until(lambda: streams(collector.grpc_target, root=tls_root) == grpc.StatusCode.OK, WITHIN, "TLS")
    return collector, log


def test_a_token_replaced_in_its_file_is_used_after_sighup_and_the_old_one_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{OLD}\n")
    collector, log = launch(tmp_path, "--tokens", str(tokens))
    try:
        assert streams(collector.grpc_target, OLD) == grpc.StatusCode.OK
        assert streams(collector.grpc_target, NEW) == grpc.StatusCode.UNAUTHENTICATED
        tokens.write_text(f"{NEW}\n")
        collector.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: streams(collector.grpc_target, NEW) == grpc.StatusCode.OK, WITHIN, "the new token")
        assert streams(collector.grpc_target, OLD) == grpc.StatusCode.UNAUTHENTICATED
        assert collector.proc.poll() is None  # the same process: no restart
    finally:
        collector.stop()
    assert "reloaded the security files" in log.read_text()


def test_a_changed_tokens_file_is_read_again_without_a_signal(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{OLD}\n")
    collector, _ = launch(tmp_path, "--tokens", str(tokens))
    try:
        tokens.write_text(f"{OLD}\n{NEW} rot\n")
        wait_until(
            lambda: streams(collector.grpc_target, NEW) == grpc.StatusCode.OK, WITHIN, "the added token"
        )
        assert streams(collector.grpc_target, OLD) == grpc.StatusCode.OK
    finally:
        collector.stop()


def test_a_reload_of_a_bad_file_changes_nothing_and_says_why(tmp_path: Path) -> None:
    """A half-written or mistyped file must neither lock agents out nor let anyone in: the
    previous tokens stay, and the log names the file and the line."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{OLD}\n")
    collector, log = launch(tmp_path, "--tokens", str(tokens))
    try:
        tokens.write_text("short\n")
        collector.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in log.read_text(), WITHIN, "the refused reload")
        assert streams(collector.grpc_target, OLD) == grpc.StatusCode.OK
        assert streams(collector.grpc_target, "short") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        collector.stop()
    assert f"tokens file {tokens}: line 1: a token has at least 16 characters" in log.read_text()


def test_a_changed_password_is_required_at_the_next_scrape_after_sighup(tmp_path: Path) -> None:
    """The verified pairs the collector remembers are forgotten: the old password, right a
    moment ago, is refused at once."""
    users = tmp_path / "users"
    users.write_text(f"prometheus:{hash_password('first', rounds=4)}\n")
    collector, _ = launch(tmp_path, "--metrics-basic-auth", str(users))

    def status(password: str) -> int:
        request = urllib.request.Request(collector.metrics_url)
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert status("first") == 200
        users.write_text(f"prometheus:{hash_password('second', rounds=4)}\n")
        collector.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: status("second") == 200, WITHIN, "the new password")
        assert status("first") == 401
    finally:
        collector.stop()


def test_a_replaced_tls_certificate_is_presented_to_new_connections_after_sighup(tmp_path: Path) -> None:
    """The certificate files are overwritten with ones of another CA: after SIGHUP a client
    that trusts only the new CA connects, and one that trusts only the old CA no longer does;
    /metrics' HTTPS certificate rotates with its files likewise."""
    old, new = Pki(_dir(tmp_path / "old")), Pki(_dir(tmp_path / "new"))
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(old.server_cert.read_bytes())
    key.write_bytes(old.server_key.read_bytes())
    collector, _ = launch(
        tmp_path,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--metrics-tls-cert",
        str(cert),
        "--metrics-tls-key",
        str(key),
        tls_root=old.ca,
    )
    try:
        assert streams(collector.grpc_target, root=old.ca) == grpc.StatusCode.OK
        assert streams(collector.grpc_target, root=new.ca) == grpc.StatusCode.UNAVAILABLE
        cert.write_bytes(new.server_cert.read_bytes())
        key.write_bytes(new.server_key.read_bytes())
        collector.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: streams(collector.grpc_target, root=new.ca) == grpc.StatusCode.OK,
            WITHIN,
            "the new certificate",
        )
        assert streams(collector.grpc_target, root=old.ca) == grpc.StatusCode.UNAVAILABLE
        context = ssl.create_default_context(cafile=str(new.ca))
        with urllib.request.urlopen(
            collector.metrics_url.replace("http:", "https:"), timeout=5, context=context
        ) as resp:
            assert resp.status == 200
    finally:
        collector.stop()


def _dir(path: Path) -> Path:
    path.mkdir()
    return path
