"""What a client can hold on the gRPC port by how it spells its token and by how it keeps its
connection (issue 23, items 1 and 15), against `thermoscope collector` processes run with `--tokens`.

Quotas count identities, not spellings: every way of writing one bearer token is one tenant. A
connection whose client stopped answering HTTP/2 pings (frozen, gone) is closed, and its streams
release the runs they held; an agent that merely sends nothing keeps its stream, since its relay
answers the pings. A PING flood gets GOAWAY and its connection closed.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from thermoscope.agent import Monitor, link
from thermoscope.collector.ingest import keepalive
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc

from helpers.http2 import ping_flood
from helpers.processes import start_collector_process
from helpers.protocol import OpenStream, frame, held_in_a_process, hello
from helpers.security import TOKEN_A, TOKEN_ANY
from helpers.training import small_model, train_steps


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN_ANY}\n{TOKEN_A}\n")
    return path


def refusal(target: str, job: str, authorization: str) -> grpc.RpcError | None:
    """The error a hello of `job` with this `authorization` value gets (None: it was answered)."""
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.TelemetryStub(channel).Stream(
            iter([hello(job)]), metadata=(("authorization", authorization),), timeout=15
        )
        try:
            list(call)
        except grpc.RpcError as exc:
            return exc
    return None


def released_within(target: str, authorization: str, seconds: float) -> bool:
    """Whether a hello with `authorization` is answered (its tenant has room) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if refusal(target, "after", authorization) is None:
            return True
        time.sleep(0.25)
    return False


# -- quotas count identities ------------------------------------------------------------------------


def test_every_spelling_of_one_token_counts_against_its_one_quota(tmp_path: Path, tokens: Path) -> None:
    collector = start_collector_process(
        tmp_path / "e.db", None, "--tokens", str(tokens), "--max-jobs-per-token", "2"
    )
    try:
        spellings = [
            f"Bearer {TOKEN_ANY}",
            f"bearer  {TOKEN_ANY}",
            f"BEARER   {TOKEN_ANY}",
            f"bEaReR {TOKEN_ANY}",
        ]
        held = [
            OpenStream(collector.grpc_target, hello(f"spelled-{i}"), metadata=(("authorization", value),))
            for i, value in enumerate(spellings[:2])
        ]
        for i, value in enumerate(spellings[2:], 2):
            refused = refusal(collector.grpc_target, f"spelled-{i}", value)
            assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "its token holds 2 runs" in refused.details()
        other = OpenStream(
            collector.grpc_target, hello("modest"), metadata=(("authorization", f"Bearer {TOKEN_A}"),)
        )
        assert other.ack(frame(1, 0)) == 1  # the other tenant streams
        other.close()
        for stream in held:
            stream.close()
    finally:
        collector.stop()


# -- half-open connections are closed ---------------------------------------------------------------


def test_a_frozen_clients_runs_are_released_within_the_keepalive_bound(tmp_path: Path, tokens: Path) -> None:
    """A client process stopped with SIGSTOP: its kernel still acknowledges TCP, so only the
    collector's pings find it; its connection is closed, its run let go, its tenant has room."""
    collector = start_collector_process(
        tmp_path / "e.db",
        None,
        *("--tokens", str(tokens), "--max-jobs-per-token", "1", "--checkpoint-interval", "0.2"),
        *("--keepalive", "1", "--keepalive-timeout", "1"),
    )
    authorization = f"Bearer {TOKEN_ANY}"
    holder = held_in_a_process(collector.grpc_target, "frozen", authorization)
    try:
        refused = refusal(collector.grpc_target, "before", authorization)
        assert (
            refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        )  # it holds the run
        os.kill(holder.pid, signal.SIGSTOP)
        assert released_within(collector.grpc_target, authorization, 30)  # the bound is 2 s: generous
    finally:
        holder.kill()
        holder.wait()
        collector.stop()


def test_an_agent_that_sends_nothing_for_longer_than_the_keepalive_bound_keeps_its_stream(
    tmp_path: Path,
) -> None:
    """A monitored training samples, then is silent for 4 s, twice the collector's bound (pings
    every 1 s, 1 s to answer): its relay answers the pings, so the stream that joined stays the
    one its next sample arrives on."""

    log = tmp_path / "collector.log"
    with open(log, "w") as out:
        collector = start_collector_process(
            tmp_path / "e.db", None, "--keepalive", "1", "--keepalive-timeout", "1", stdout=out, stderr=out
        )
    try:
        model, opt = small_model()
        monitor = Monitor(model, opt, collector=collector.grpc_target, job="rare", every=1)
        try:
            train_steps(monitor, model, opt, 2)
            assert monitor.flush(15)
            time.sleep(4)
            train_steps(monitor, model, opt, 2)
            assert monitor.flush(15)
            assert monitor.delivered >= 2
        finally:
            monitor.close()
    finally:
        collector.stop()
    text = log.read_text()
    assert text.count("agent joined: job rare") == 1, text
    assert "agent lost" not in text


def test_the_agents_own_pings_are_allowed_by_the_collectors_policy() -> None:
    """An agent pings every `PING_INTERVAL_MS`, also while it sends nothing; the collector allows
    one every `MIN_PING_INTERVAL_MS` without data (faster earns strikes, then GOAWAY)."""
    options = dict(link.CHANNEL_OPTIONS)
    assert options["grpc.keepalive_time_ms"] == link.PING_INTERVAL_MS >= keepalive.MIN_PING_INTERVAL_MS
    assert options["grpc.http2.max_pings_without_data"] == 0


# -- a PING flood is closed -------------------------------------------------------------------------


def test_a_ping_flood_gets_goaway_and_its_connection_is_closed(tmp_path: Path, tokens: Path) -> None:
    """Six connections flood PINGs at once for up to 40 s (a generous bound: the look closes
    them within seconds), each from 0.2 s after its handshake. grpc
    sends each GOAWAY `too_many_pings` (11, ENHANCE_YOUR_CALM) at once, but closes only the
    connections it caught between two writes; the others (13 of 18 in three runs) it went on
    reading and answering, ~1 CPU-s a second each, until the collector's look at its connections
    shut them down, after 3 s of it (a reset may drop the GOAWAY unread: None)."""
    collector = start_collector_process(tmp_path / "e.db", None, "--tokens", str(tokens))
    try:
        host, port = collector.grpc_target.rsplit(":", 1)
        with ThreadPoolExecutor(6) as pool:
            floods = list(pool.map(lambda _: ping_flood(host, int(port), 40.0, pause=0.2), range(6)))
        assert {flood.goaway for flood in floods} <= {11, None} and 11 in {flood.goaway for flood in floods}
        assert [flood.closed_at is not None for flood in floods] == [True] * 6, floods  # EOF, or reset
        # the collector still serves agents
        stream = OpenStream(
            collector.grpc_target, hello("after"), metadata=(("authorization", f"Bearer {TOKEN_A}"),)
        )
        assert stream.ack(frame(1, 0)) == 1
        stream.close()
    finally:
        collector.stop()
