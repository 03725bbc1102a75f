"""Authentication and authorization: bearer tokens bound to job prefixes, TLS and mutual TLS on
gRPC, TLS and basic auth on /metrics, and the refusal to listen exposed without any of them.

Real collectors on 127.0.0.1, real channels; throwaway certificates made here (`cryptography`).
"""

from __future__ import annotations

import base64
import getpass
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from thermoscope.agent import Monitor
from thermoscope.cli.main import main
from thermoscope.collector.credentials import AuthConfigError
from thermoscope.collector.exposition.passwords import BasicAuthUsers, hash_password
from thermoscope.collector.ingest import grpc_auth
from thermoscope.collector.security import InsecureError, Security
from thermoscope.collector.service import Collector
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc
from thermoscope.wire.contract import is_loopback

from helpers.processes import free_port, stop_process, thermoscope, wait_serving
from helpers.protocol import frame, hello
from helpers.security import TOKEN_A, TOKEN_ANY, monitor_delivers
from helpers.training import small_model, train_steps


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# who may stream\n{TOKEN_ANY}\n{TOKEN_A} teamA-   # team A's jobs only\n\n")
    return path


# -- helpers ------------------------------------------------------------------------------------------


def call(target: str, messages, *, metadata=None, credentials=None):
    """Send `messages` on one stream; (replies, error or None)."""
    channel = (
        grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    )
    with channel:
        replies = []
        try:
            replies.extend(
                pb_grpc.TelemetryStub(channel).Stream(iter(messages), metadata=metadata, timeout=15)
            )
        except grpc.RpcError as exc:
            return replies, exc
        return replies, None


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- tokens -------------------------------------------------------------------------------------------


def test_a_stream_without_a_valid_token_is_unauthenticated_and_counted(tmp_path, tokens_file) -> None:
    security = Security(tokens=tokens_file)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running() as c:
        wait_serving(c.grpc_target)  # the health service needs no token
        for metadata in (None, bearer("not-a-known-token-at-all"), (("authorization", TOKEN_ANY),)):
            replies, error = call(c.grpc_target, [hello("j1"), frame(1, 0)], metadata=metadata)
            assert replies == [] and error is not None
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert c.jobs == {}
        assert c.snapshot() == {}
        with urllib.request.urlopen(c.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        assert 'thermoscope_frames_rejected_total{reason="unauthenticated"} 3.0' in text

        replies, error = call(c.grpc_target, [hello("j1"), frame(1, 0)], metadata=bearer(TOKEN_ANY))
        assert error is None, error
        assert [r.WhichOneof("body") for r in replies][:2] == ["config", "ack"]


def test_a_monitor_with_the_token_streams_and_one_without_delivers_nothing(tokens_file, monkeypatch) -> None:
    with Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=None, security=Security(tokens=tokens_file)
    ).running() as c:
        assert monitor_delivers(c.grpc_target, "tok", token=TOKEN_ANY) == 5
        monkeypatch.setenv("THERMOSCOPE_TOKEN", TOKEN_ANY)
        assert monitor_delivers(c.grpc_target, "env") == 5  # from the environment
        monkeypatch.delenv("THERMOSCOPE_TOKEN")
        model, opt = small_model()
        monitor = Monitor(model, opt, collector=c.grpc_target, job="none", every=1)
        train_steps(monitor, model, opt, 2)
        deadline = time.monotonic() + 10
        while "UNAUTHENTICATED" not in (monitor.last_error or ""):
            assert time.monotonic() < deadline, monitor.last_error
            time.sleep(0.05)
        monitor.close(0.5)
        assert monitor.delivered == 0 and monitor.dropped == 2
        assert set(c.snapshot()) == {"tok", "env"}


def test_a_token_bound_to_a_prefix_writes_only_its_teams_jobs(tokens_file) -> None:
    with Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=None, security=Security(tokens=tokens_file)
    ).running() as c:
        replies, error = call(c.grpc_target, [hello("teamA-x"), frame(1, 0)], metadata=bearer(TOKEN_A))
        assert error is None and [r.WhichOneof("body") for r in replies][:2] == ["config", "ack"]

        replies, error = call(c.grpc_target, [hello("teamB-y"), frame(1, 0)], metadata=bearer(TOKEN_A))
        assert replies == [] and error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "teamA-" in error.details() and "teamB-y" in error.details()
        assert c.telemetry.rejected["forbidden_job"] == 1
        assert set(c.snapshot()) == {"teamA-x"}

        # the unbound token may write any job
        _, error = call(c.grpc_target, [hello("teamB-y"), frame(1, 0)], metadata=bearer(TOKEN_ANY))
        assert error is None
        assert monitor_delivers(c.grpc_target, "teamA-monitor", token=TOKEN_A) == 5


def test_token_table_matches_every_entry_and_reports_bad_files(tmp_path) -> None:
    table = grpc_auth.TokenTable([(TOKEN_ANY, ""), (TOKEN_A, "teamA-")])
    assert table.match(TOKEN_A) == grpc_auth.Principal(2, "teamA-")
    assert table.match(TOKEN_A[:-1]) is None and table.match("") is None
    assert grpc_auth.bearer([("Authorization", "bearer  abc ")]) == "abc"
    assert grpc_auth.bearer([("authorization", "Basic abc")]) is None
    for text, why in [
        ("", "no tokens"),
        ("short\n", "line 1: a token has at least 16"),
        (f"# c\n{TOKEN_A}\n{TOKEN_A} x\n", "line 3: the same token as line 2"),
        (f"{TOKEN_A} a b\n", "line 1: expected `TOKEN [JOB_PREFIX]`"),
    ]:
        path = tmp_path / "t"
        path.write_text(text)
        with pytest.raises(AuthConfigError, match=re.escape(why)):
            grpc_auth.TokenTable.load(path)
    with pytest.raises(AuthConfigError, match="cannot read the tokens file"):
        grpc_auth.TokenTable.load(tmp_path / "missing")


# -- TLS ----------------------------------------------------------------------------------------------


def test_tls_streams_with_the_ca_and_refuses_plaintext(pki, tokens_file) -> None:
    security = Security(tokens=tokens_file, tls_cert=pki.server_cert, tls_key=pki.server_key)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running() as c:
        assert monitor_delivers(c.grpc_target, "tls", token=TOKEN_ANY, tls_root_cert=pki.ca) == 5
        credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
        _, error = call(c.grpc_target, [hello("tls2")], credentials=credentials)  # TLS, but no token
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        _, error = call(c.grpc_target, [hello("plain")], metadata=bearer(TOKEN_ANY))  # token, no TLS
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert set(c.snapshot()) == {"tls"}


def test_mutual_tls_refuses_a_client_without_a_certificate(pki) -> None:
    security = Security(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running() as c:
        ca = pki.ca.read_bytes()
        _, error = call(c.grpc_target, [hello("anon")], credentials=grpc.ssl_channel_credentials(ca))
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        delivered = monitor_delivers(
            c.grpc_target,
            "mtls",
            tls_root_cert=ca,
            tls_client_cert=pki.client_cert,
            tls_client_key=pki.client_key,
        )
        assert delivered == 5
        assert set(c.snapshot()) == {"mtls"}


def test_hash_password_prints_a_basic_auth_line_the_collector_accepts(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(getpass, "getpass", lambda prompt: "s3cret")  # what the user types, unechoed
    assert main(["hash-password", "prometheus"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("prometheus:$2b$")  # bcrypt
    users = tmp_path / "users"
    users.write_text(line + "\n")
    loaded = BasicAuthUsers.load(users)
    assert loaded.check("prometheus", "s3cret")
    assert not loaded.check("prometheus", "wrong")


def test_the_security_side_imports_nothing_of_the_servicer() -> None:
    """gRPC auth, /metrics auth and the `Security` bundle sit below the servicer, never beside it."""
    code = (
        "import sys\n"
        "import thermoscope.collector.security\n"
        "servicer = {'server', 'service', 'merge', 'job', 'pipeline', 'checkpoint', 'export', 'store'}\n"
        "print(sorted(m for m in sys.modules if m.startswith('thermoscope.collector.')\n"
        "             and m.rsplit('.', 1)[1] in servicer))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_metrics_over_tls_with_basic_auth(pki, tmp_path) -> None:
    users = tmp_path / "users"
    users.write_text(f"# scrapers\nprometheus:{hash_password('s3cret', rounds=4)}\n")
    security = Security(
        metrics_tls_cert=pki.server_cert, metrics_tls_key=pki.server_key, metrics_basic_auth=users
    )
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running() as c:
        assert c.metrics_url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(pki.ca))

        def get(user_password: str | None) -> tuple[int, str]:
            request = urllib.request.Request(c.metrics_url)
            if user_password is not None:
                request.add_header(
                    "Authorization", "Basic " + base64.b64encode(user_password.encode()).decode()
                )
            try:
                with urllib.request.urlopen(request, timeout=5, context=context) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers.get("WWW-Authenticate", "")

        assert get(None) == (401, 'Basic realm="thermoscope"')
        assert get("prometheus:wrong")[0] == 401
        assert get("nobody:s3cret")[0] == 401
        status, text = get("prometheus:s3cret")
        assert status == 200 and "thermoscope_collector_info" in text
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext HTTP gets no page
            urllib.request.urlopen(c.metrics_url.replace("https", "http"), timeout=5)
        with socket.create_connection(("127.0.0.1", c.metrics_port)):  # a client that never handshakes
            assert get("prometheus:s3cret")[0] == 200  # holds only its own thread


# -- refusing to listen exposed -----------------------------------------------------------------------


def test_collector_refuses_a_non_loopback_address_unprotected(pki, tokens_file, tmp_path) -> None:
    with pytest.raises(InsecureError, match="--tokens FILE"):
        Collector("0.0.0.0:0", "127.0.0.1:0", db=None)
    with pytest.raises(InsecureError, match="--metrics-basic-auth"):
        Collector("127.0.0.1:0", "[::]:0", db=None, security=Security(tokens=tokens_file))
    for host in ("127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.org"):
        assert not is_loopback(host)
    Collector("0.0.0.0:0", "127.0.0.1:0", db=None, security=Security(tokens=tokens_file))
    Collector("0.0.0.0:0", "127.0.0.1:0", db=None, security=Security(insecure=True))
    with pytest.raises(AuthConfigError, match="go together"):
        Security(tls_cert=pki.server_cert)


@pytest.mark.slow
def test_cli_refuses_to_listen_exposed_and_says_why_unless_insecure(tmp_path, tokens_file) -> None:
    port = free_port()
    args = ["collector", "--grpc", f"0.0.0.0:{port}", "--metrics", f"127.0.0.1:{free_port()}"]
    args += ["--db", str(tmp_path / "events.db")]
    refused = thermoscope(*args, timeout=60)
    assert refused.returncode == 2
    assert "0.0.0.0, which is not loopback" in refused.stderr
    assert "--tokens FILE" in refused.stderr and "--insecure" in refused.stderr

    bad = tmp_path / "bad"
    bad.write_text("short-token\n")
    refused = thermoscope(*args, "--tokens", str(bad), timeout=60)
    assert refused.returncode == 2 and "line 1: a token has at least 16" in refused.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "thermoscope.cli", *args, "--insecure"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_serving(f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop_process(proc)
