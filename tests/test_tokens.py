"""Security settings mean what they say: a prefix-bound token stops at a name boundary, a `#` inside a
token is part of it, bad TLS files stop the collector at start naming the file, and a security test
that cannot run fails instead of skipping.

Real collectors on 127.0.0.1 with real tokens files, the real `thermoscope` command, real pytest runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from thermoscope.collector.security import Security
from thermoscope.collector.service import Collector
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc

from helpers.processes import thermoscope
from helpers.protocol import frame, hello

REPO = Path(__file__).resolve().parents[1]
TEAM_A = "team-a-token-0123456789"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def call(target: str, job: str, token: str) -> grpc.RpcError | None:
    """Stream a hello and one frame of `job` with `token`; the error, or None if acknowledged."""
    with grpc.insecure_channel(target) as channel:
        replies = pb_grpc.TelemetryStub(channel).Stream(
            iter([hello(job), frame(1, 0)]), metadata=bearer(token), timeout=15
        )
        try:
            kinds = [r.WhichOneof("body") for r in replies]
        except grpc.RpcError as exc:
            return exc
    assert kinds[:2] == ["config", "ack"], kinds
    return None


# -- job prefixes -------------------------------------------------------------------------------------


def test_a_prefix_token_streams_its_teams_jobs_but_not_a_longer_name_that_starts_alike(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TEAM_A} teamA\n")
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=Security(tokens=tokens)).running() as c:
        for job in ("teamA", "teamA-train", "teamA_eval", "teamA.sweep", "teamA/run1", "teamA:7"):
            assert call(c.grpc_target, job, TEAM_A) is None, job
        for job in ("teamAx-train", "teamAB", "teamA0"):
            error = call(c.grpc_target, job, TEAM_A)
            assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED, job
            assert "'teamA'" in error.details() and repr(job) in error.details()
        assert c.telemetry.rejected["forbidden_job"] == 3
        assert "teamAx-train" not in c.snapshot()


# -- the tokens file ----------------------------------------------------------------------------------


def test_a_hash_inside_a_token_is_part_of_it_and_only_starts_a_comment_after_whitespace(
    tmp_path: Path,
) -> None:
    token = "0123456789abcdef#ghij"  # before the `#`, still 16 characters: a valid token of its own
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# who may stream\n{token} team#1   # team one's jobs\n  #indented comment\n")
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=Security(tokens=tokens)).running() as c:
        assert call(c.grpc_target, "team#1-train", token) is None
        error = call(c.grpc_target, "team#1-train", token.split("#")[0])
        assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED


# -- TLS files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "message"),
    [
        ("{tmp}/missing.pem", "{key}", None, "cannot read the TLS certificate {tmp}/missing.pem"),
        ("{garbage}", "{key}", None, "the TLS certificate {garbage} holds no PEM certificate"),
        ("{key}", "{cert}", None, "the TLS certificate {key} holds no PEM certificate"),
        ("{cert}", "{garbage}", None, "the TLS key {garbage} holds no PEM private key"),
        (
            "{cert}",
            "{client_key}",
            None,
            "the TLS certificate {cert} does not load with the key {client_key}",
        ),
        ("{cert}", "{key}", "{garbage}", "the client CA {garbage} holds no PEM certificate"),
    ],
)
def test_bad_tls_files_stop_the_collector_at_start_naming_the_file(
    pki, tmp_path: Path, cert: str, key: str, client_ca: str | None, message: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN NOTHING-----\nnot base64 at all\n-----END NOTHING-----\n")
    names = {
        "tmp": tmp_path,
        "garbage": garbage,
        "cert": pki.server_cert,
        "key": pki.server_key,
        "client_key": pki.client_key,
    }
    args = ["collector", "--grpc", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--db", str(tmp_path / "e.db")]
    args += ["--tls-cert", cert.format(**names), "--tls-key", key.format(**names)]
    if client_ca is not None:
        args += ["--tls-client-ca", client_ca.format(**names)]
    result = thermoscope(*args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message.format(**names) in result.stderr
    assert "Traceback" not in result.stderr and "Failed to bind" not in result.stderr


# -- the security tests themselves --------------------------------------------------------------------

#: A pytest plugin (`-p`) that makes `cryptography` unimportable, as on a machine without it.
NO_CRYPTOGRAPHY = textwrap.dedent(
    """
    import sys

    class NoCryptography:
        def find_spec(self, name, path=None, target=None):
            if name == "cryptography" or name.startswith("cryptography."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, NoCryptography())
    """
)


@pytest.mark.slow
def test_a_security_test_without_cryptography_fails_instead_of_skipping(tmp_path: Path) -> None:
    (tmp_path / "no_cryptography.py").write_text(NO_CRYPTOGRAPHY)
    tests = [
        "tests/test_auth.py::test_mutual_tls_refuses_a_client_without_a_certificate",
        "tests/test_attach_security.py::test_packed_security_carries_contents_not_paths_and_unpacks_"
        "for_the_collector_only_while_it_starts",
        "tests/test_tokens.py::test_bad_tls_files_stop_the_collector_at_start_naming_the_file",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no_cryptography", "-p", "no:cacheprovider", "-q", *tests],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "skipped" not in summary and "8 errors" in summary, result.stdout
    assert "No module named 'cryptography" in result.stdout
