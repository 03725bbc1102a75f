"""A node's aggregator is guarded as the collector is: it proves itself upstream as an agent does
(its token from the agents' environment), so a collector run with `--tokens` takes its node
stream; it takes only the ranks that present a token it knows (its own, or one of `--tokens`,
within that token's job prefix), so a local process without it can neither fix the node's job
nor stream under the aggregator's identity; and a rank's slot is its open call's: a second hello
for the same rank is refused, and the job's energy stays the real rank's.

Real `thermoscope aggregator` processes, a real `thermoscope collector --tokens` process (and an
in-process collector where the test reads the job's reading), raw-protocol ranks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from thermoscope.collector.service import Collector
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc

from helpers.metrics import wait_for_value, wait_until
from helpers.processes import free_port, start_collector_process, stop_process
from helpers.protocol import OpenStream, frame, hello
from helpers.security import TOKEN_A, TOKEN_ANY

JOB = "teamA-train"


@contextlib.contextmanager
def aggregator(collector: str, *options: str, token: str | None = None) -> Iterator[str]:
    """`thermoscope aggregator` for 2 ranks as its own process, with the agents' `token` in its
    environment: its loopback address."""
    target = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("THERMOSCOPE_")}
    if token is not None:
        env["THERMOSCOPE_TOKEN"] = token
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "thermoscope.cli", "aggregator"),
            *("--collector", collector, "--listen", target, "--ranks", "2", *options),
        ],
        env=env,
    )
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield target
    finally:
        stop_process(proc)


def bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def refused(target: str, messages: list, token: str | None = None) -> grpc.RpcError:
    """How the aggregator ended a call that sent `messages` with `token`."""
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.TelemetryStub(channel).Stream(iter(messages), metadata=bearer(token), timeout=15)
        with pytest.raises(grpc.RpcError) as error:
            list(call)
    return error.value


def rank(target: str, r: int, token: str | None = TOKEN_A, job: str = JOB) -> OpenStream:
    return OpenStream(target, hello(job, rank=r, world_size=2), metadata=bearer(token))


def acked(s: OpenStream, seq: int) -> int:
    """The seq of the first ack the stream gets (configs skipped)."""
    while not (reply := s.reply(timeout=30)).HasField("ack"):
        pass
    assert reply.ack.seq == seq
    return reply.ack.seq


def test_ranks_through_an_aggregator_with_the_jobs_token_reach_a_collector_run_with_tokens(tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A} teamA\n")
    collector = start_collector_process(tmp_path / "e.db", None, "--tokens", str(tokens))
    try:
        with aggregator(collector.grpc_target, token=TOKEN_A) as target:
            ranks = [rank(target, r) for r in range(2)]
            for step in range(3):
                for s in ranks:
                    s.send(frame(step + 1, step))
                for s in ranks:
                    assert acked(s, step + 1) == step + 1  # the collector took the node frame
            wait_for_value(collector.metrics_url, "thermoscope_last_step", 2, timeout=30, job_id=JOB)
            for s in ranks:
                s.close()
    finally:
        collector.stop()


def test_a_local_process_without_the_token_can_neither_fix_the_nodes_job_nor_stream(collector: Collector):
    with aggregator(collector.grpc_target, token=TOKEN_A) as target:
        for token in (None, "not-a-token-of-this-node"):  # a stranger, for another job
            error = refused(target, [hello("teamB-prod", rank=0, world_size=2)], token)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        ranks = [rank(target, r) for r in range(2)]  # the real ranks: the node is theirs
        for s in ranks:
            s.send(frame(1, 0))
        assert [acked(s, 1) for s in ranks] == [1, 1]
        for s in ranks:
            s.close()


def test_a_rank_token_outside_its_job_prefix_is_refused_by_the_aggregator(
    tmp_path: Path, collector: Collector
):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A} teamA\n{TOKEN_ANY}\n")
    with aggregator(collector.grpc_target, "--tokens", str(tokens)) as target:
        error = refused(target, [hello("teamB-prod", rank=0, world_size=2)], TOKEN_A)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "teamB-prod" in error.details()
        ranks = [rank(target, 0, TOKEN_A), rank(target, 1, TOKEN_ANY)]
        for s in ranks:
            s.close()


def test_a_second_hello_for_an_open_rank_is_refused_and_the_job_reads_the_real_ranks_energy(
    collector: Collector,
):
    with aggregator(collector.grpc_target) as target:  # no tokens: any local process may connect
        ranks = [rank(target, r, token=None) for r in range(2)]
        error = refused(target, [hello(JOB, rank=1, world_size=2), frame(1, 0, energy=999_999.0)])
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "rank 1" in error.details()
        for s in ranks:
            s.send(frame(1, 0, energy=1.0))
        assert [acked(s, 1) for s in ranks] == [1, 1]
        wait_until(
            lambda: JOB in collector.jobs and collector.jobs[JOB].merged_step == 0, 30, "step 0 merged"
        )
        assert collector.jobs[JOB].reading.energy == pytest.approx(1.0)
        for s in ranks:
            s.close()
