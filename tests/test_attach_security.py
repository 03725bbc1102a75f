"""Security for the Ray collector actor, without a Ray cluster: what `attach` and `collector --ray`
refuse before anything starts, how the files travel to the actor (`actor.PackedSecurity`), and what
an agent without the token says. The real actor on a real cluster: tests/test_ray.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import grpc
import pytest

from thermoscope.agent import Monitor
from thermoscope.collector.actor import PackedSecurity
from thermoscope.collector.security import InsecureError, Security
from thermoscope.collector.service import Collector

from helpers.processes import thermoscope
from helpers.security import TOKEN_ANY, monitor_delivers
from helpers.training import small_model, train_steps

#: No Ray cluster listens here: a command that got past its checks would fail to connect (exit 1).
NO_CLUSTER = "127.0.0.1:1"


@pytest.fixture
def files(tmp_path: Path, pki) -> dict[str, Path]:
    """Good and bad security files."""
    paths = {
        "tokens": tmp_path / "tokens",
        "short": tmp_path / "short-token",
        "garbage": tmp_path / "garbage.pem",
        "users": tmp_path / "users",
    }
    paths["tokens"].write_text(f"{TOKEN_ANY}\n")
    paths["short"].write_text("short\n")
    paths["garbage"].write_text("not a PEM file\n")
    paths["users"].write_text("prometheus-without-a-hash\n")
    return paths | {"cert": pki.server_cert, "key": pki.server_key, "ca": pki.ca}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("attach", ["--tokens", "{tmp}/missing"], "attach: cannot read the tokens file"),
        ("attach", ["--tokens", "{short}"], "line 1: a token has at least 16 characters"),
        ("attach", ["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
        ("attach", ["--tls-cert", "{garbage}", "--tls-key", "{key}"], "{garbage} holds no PEM certificate"),
        ("attach", ["--tls-cert", "{cert}", "--tls-key", "{garbage}"], "{garbage} holds no PEM private key"),
        (
            "attach",
            ["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-ca", "{garbage}"],
            "the client CA {garbage} holds no PEM certificate",
        ),
        ("attach", ["--metrics-basic-auth", "{users}"], "{users} line 1: expected USER:HASH"),
        ("collector", ["--ray", "--tokens", "{short}"], "collector --ray: tokens file {short}: line 1"),
    ],
)
def test_bad_security_flags_exit_2_before_ray_is_joined(
    command: str, flags: list[str], message: str, files: dict[str, Path], tmp_path: Path
) -> None:
    names = {name: str(path) for name, path in files.items()} | {"tmp": str(tmp_path)}
    result = thermoscope(command, "--address", NO_CLUSTER, *(f.format(**names) for f in flags), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message.format(**names) in result.stderr
    assert "Ray cluster" not in result.stderr  # refused before connecting: nothing was started


def test_packed_security_carries_contents_not_paths_and_unpacks_for_the_collector_only_while_it_starts(
    files: dict[str, Path], tmp_path: Path
) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(files["cert"].read_bytes())
    key.write_bytes(files["key"].read_bytes())
    packed = PackedSecurity.pack(Security(tokens=files["tokens"], tls_cert=cert, tls_key=key))
    assert TOKEN_ANY not in repr(packed) and "PRIVATE KEY" not in repr(packed)
    for path in (files["tokens"], cert, key):  # the actor's node need not have the driver's files
        path.unlink()

    with contextlib.ExitStack() as running:  # as the actor does
        with packed.unpacked() as security:
            unpacked = Path(security.tokens).parent
            assert unpacked.stat().st_mode & 0o777 == 0o700
            assert {p.stat().st_mode & 0o777 for p in unpacked.iterdir()} == {0o600}
            collector = running.enter_context(
                Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running()
            )
        assert not unpacked.exists()  # the files lived only while the collector loaded them
        assert monitor_delivers(collector.grpc_target, "tls", token=TOKEN_ANY, tls_root_cert=files["ca"]) == 5

    with pytest.raises(InsecureError, match=r"10\.0\.0\.5, which is not loopback"):
        PackedSecurity().check_exposure("10.0.0.5")
    PackedSecurity(insecure=True).check_exposure("10.0.0.5")


def test_an_agent_without_the_token_says_once_how_to_give_it_and_keeps_retrying(
    files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    security = Security(tokens=files["tokens"])
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running() as c:
        model, opt = small_model()
        caplog.set_level(logging.WARNING, logger="thermoscope.agent")
        monitor = Monitor(model, opt, collector=lambda: c.grpc_target, job="no-token", every=1)
        try:
            deadline = time.monotonic() + 20
            while c.telemetry.rejected["unauthenticated"] < 3:  # the agent keeps trying, with backoff
                assert time.monotonic() < deadline, monitor.last_error
                train_steps(monitor, model, opt, 1)  # training goes on (its first sample opens the stream)
                time.sleep(0.05)
        finally:
            monitor.close(0.5)
    said = [r.getMessage() for r in caplog.records if r.name == "thermoscope.agent"]
    refused = [m for m in said if grpc.StatusCode.UNAUTHENTICATED.name in m]
    assert len(refused) == 1, said
    assert "$THERMOSCOPE_TOKEN or $THERMOSCOPE_TOKEN_FILE" in refused[0] and "runtime_env" in refused[0]
