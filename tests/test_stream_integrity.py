"""One stream cannot spoil another's frames or its job's state (issue 23, items 4, 11, 12, 13).

Real collector processes on 127.0.0.1 (one with `--tokens`), raw-protocol agents:

- a (run, rank) belongs to the identity that opened it: another token's hello for it is refused;
- a frame whose step leaps beyond what the job could have reached is refused, so it neither
  swallows the real agent's next frames as duplicates nor strands the job's last step (across a
  restart too) nor hides a restarted worker; a legitimate resume from a checkpoint is accepted;
- the durable mark a stream is told never exceeds the frames that stream sent;
- edges a job's only rank bound on the default run id are released when its stream ends;
- a replay of frames whose wall time the collector clamped counts each frame once;
- a rank whose layer table changed while the job still holds its samples is refused with a
  clear status, and the step the other ranks send merges whole.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from thermoscope.collector.state.job import STEP_AHEAD
from thermoscope.science.stats import LayerInfo
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc
from thermoscope.wire.codec import MAX_SEQ

from helpers.metrics import scrape, value
from helpers.processes import CollectorProcess, free_port, start_collector_process, stop_process
from helpers.protocol import OpenStream, frame, hello
from helpers.security import TOKEN_A, TOKEN_ANY

TEAM = "teamA"
JOB = f"{TEAM}-job"
#: A model's two layers with other histogram edges than a raw agent's (-1, 1).
WIDE = [LayerInfo(f"layer{i}", (100,), 100, "float32", hist_lo=-4.0, hist_hi=4.0) for i in range(2)]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorProcess]:
    """A collector process with a database, checkpointing every 0.1 s."""
    process = start_collector_process(tmp_path / "events.db", None, "--checkpoint-interval", "0.1")
    try:
        yield process
    finally:
        process.stop()


def counters(c: CollectorProcess, job: str = JOB) -> dict[str, float]:
    metrics = scrape(c.metrics_url)
    names = ("frames_received_total", "frames_duplicate_total", "last_step")
    return {name: value(metrics, f"thermoscope_{name}", job_id=job) for name in names}


def settled(c: CollectorProcess, name: str, expected: float, timeout: float = 15.0, **labels: str) -> float:
    """`name{labels}` once it reads `expected` (within `timeout` s), else what it reads then."""
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(c.metrics_url).get((name, frozenset(labels.items())), math.nan)
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def rejected(c: CollectorProcess, reason: str) -> float:
    return scrape(c.metrics_url).get(
        ("thermoscope_frames_rejected_total", frozenset({("reason", reason)})), 0
    )


def refused_hello(target: str, msg, token: str) -> grpc.RpcError:
    """The error that refused a stream's hello (it must be refused)."""
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.TelemetryStub(channel).Stream(iter([msg]), metadata=bearer(token), timeout=15)
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
        return refused.value


def refusal(stream: OpenStream) -> grpc.RpcError:
    """The status that ended the stream's call (it must have ended)."""
    with pytest.raises(EOFError):
        while True:
            stream.reply()
    return stream._call


def stream_frames(stream: OpenStream, seqs: range, step0: int = 0) -> list[int]:
    """Send frames `seqs` (frame n at step `step0 + n`); the durable marks of their acks."""
    durable = []
    for seq in seqs:
        stream.send(frame(seq, step0 + seq))
        reply = stream.reply()
        assert reply.ack.seq == seq
        durable.append(reply.ack.durable)
    return durable


# -- item 4: one forged frame ------------------------------------------------------------------------


def test_another_identity_cannot_open_a_rank_that_a_token_streams(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A} {TEAM}\n{TOKEN_ANY} {TEAM}\n")
    c = start_collector_process(tmp_path / "events.db", None, "--tokens", str(tokens))
    try:
        real = OpenStream(c.grpc_target, hello(JOB), metadata=bearer(TOKEN_A))
        stream_frames(real, range(1, 11))
        forged = refused_hello(c.grpc_target, hello(JOB), TOKEN_ANY)  # the same (run, rank), another token
        assert forged.code() == grpc.StatusCode.PERMISSION_DENIED, forged.details()
        assert "belongs to" in forged.details()
        stream_frames(real, range(11, 31))
        real.close()
        got = counters(c)
        assert (got["frames_received_total"], got["frames_duplicate_total"]) == (30, 0), got
        other_rank = OpenStream(c.grpc_target, hello(JOB, rank=1, world_size=2), metadata=bearer(TOKEN_ANY))
        assert other_rank.ack(frame(1, 31)) == 1  # its own rank is its to open
        other_rank.close()
    finally:
        c.stop()


def test_a_forged_frame_that_leaps_steps_is_refused_and_suppresses_nothing(
    collector: CollectorProcess, tmp_path: Path
) -> None:
    real = OpenStream(collector.grpc_target, hello(JOB))
    stream_frames(real, range(1, 11))
    forger = OpenStream(collector.grpc_target, hello(JOB))  # the same (run, rank), the same identity
    forger.send(frame(MAX_SEQ, 1 << 62))
    assert refusal(forger).code() == grpc.StatusCode.INVALID_ARGUMENT
    stream_frames(real, range(11, 31))
    real.close()
    assert settled(collector, "thermoscope_last_step", 30, job_id=JOB) == 30
    got = counters(collector)
    assert (got["frames_received_total"], got["frames_duplicate_total"]) == (30, 0), got
    assert rejected(collector, "step_jump") == 1
    collector.stop()  # a restart keeps the job's real last step, and a restarted worker streams
    again = start_collector_process(tmp_path / "events.db", None)
    try:
        worker = OpenStream(again.grpc_target, hello(JOB))  # its frames number from 1 again
        stream_frames(worker, range(1, 6), step0=30)
        worker.close()
        assert settled(again, "thermoscope_last_step", 35, job_id=JOB) == 35
    finally:
        again.stop()


def test_a_resume_from_a_checkpoint_and_a_leap_within_the_bound_are_accepted(
    collector: CollectorProcess,
) -> None:
    first = OpenStream(collector.grpc_target, hello(JOB))
    stream_frames(first, range(1, 6), step0=1000)
    first.close()
    resumed = OpenStream(collector.grpc_target, hello(JOB))  # restarted from its checkpoint at step 500
    stream_frames(resumed, range(1, 4), step0=500)  # late (merged already), not refused
    stream_frames(resumed, range(4, 6), step0=1005)  # past where the job was
    stream_frames(resumed, range(6, 7), step0=1005 + STEP_AHEAD - 6)  # a long pause's leap
    resumed.close()
    assert settled(collector, "thermoscope_last_step", 1005 + STEP_AHEAD, job_id=JOB) == 1005 + STEP_AHEAD


def test_a_stream_is_never_told_durable_beyond_the_frames_it_sent(collector: CollectorProcess) -> None:
    real = OpenStream(collector.grpc_target, hello(JOB))
    stream_frames(real, range(1, 11))
    other = OpenStream(collector.grpc_target, hello(JOB))  # a second stream of the same rank
    assert other.ack(frame(1_000_000, 11)) == 1_000_000
    other.close()  # its last ack waited for a checkpoint: its mark is durable
    (durable,) = stream_frames(real, range(11, 12), step0=1)
    real.close()
    assert durable <= 11, f"told durable up to {durable} after sending 11 frames"


@contextlib.contextmanager
def aggregator(c: CollectorProcess, ranks: int) -> Iterator[str]:
    """`thermoscope aggregator` for `ranks` ranks of a node, as its own process: its address."""
    target = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "thermoscope.cli", "aggregator"),
            *("--collector", c.grpc_target, "--listen", target, "--ranks", str(ranks)),
        ]
    )
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield target
    finally:
        stop_process(proc)


def test_a_forged_frame_beside_a_node_aggregator_is_refused_and_the_node_streams_on(
    collector: CollectorProcess,
) -> None:
    with aggregator(collector, ranks=2) as node:
        ranks = [OpenStream(node, hello(JOB, rank=r, world_size=2)) for r in (0, 1)]

        def steps(seqs: range) -> None:
            for r in ranks:
                for seq in seqs:
                    r.send(frame(seq, seq))
            for r in ranks:  # acknowledged once the collector took the node's frames
                while r.reply(timeout=30).ack.seq < seqs[-1]:
                    pass

        steps(range(1, 6))
        forger = OpenStream(collector.grpc_target, hello(JOB, world_size=2))  # rank 0, straight in
        forger.send(frame(MAX_SEQ, 1 << 62))
        assert refusal(forger).code() == grpc.StatusCode.INVALID_ARGUMENT
        steps(range(6, 11))
        for r in ranks:
            r.close()
    assert settled(collector, "thermoscope_last_step", 10, job_id=JOB) == 10
    assert rejected(collector, "step_jump") == 1


# -- item 11: edges on the default run id ---------------------------------------------------------


def test_edges_a_finished_squatter_bound_on_the_default_run_are_released(collector: CollectorProcess) -> None:
    squatter = OpenStream(collector.grpc_target, hello(JOB, run=""))
    assert squatter.ack(frame(1, 7)) == 1
    squatter.close()
    for rank in (0, 1):  # the job's real ranks, with the edges of their model
        real = OpenStream(collector.grpc_target, hello(JOB, run="", rank=rank, world_size=2, layers=WIDE))
        assert real.ack(frame(1, 1)) == 1
        real.close()
    assert rejected(collector, "edges_mismatch") == 0
    assert settled(collector, "thermoscope_last_step", 1, job_id=JOB) == 1


def test_edges_a_squatter_bound_before_a_crash_are_released_when_its_run_resumes(
    collector: CollectorProcess, tmp_path: Path
) -> None:
    squatter = OpenStream(collector.grpc_target, hello(JOB, run=""))
    assert squatter.ack(frame(1, 7)) == 1
    time.sleep(0.5)  # a checkpoint holds its tables
    collector.proc.kill()  # the collector dies with the squatter's stream open
    collector.proc.wait()
    squatter.cancel()
    again = start_collector_process(tmp_path / "events.db", None)
    try:
        real = OpenStream(again.grpc_target, hello(JOB, run="", layers=WIDE))
        assert real.ack(frame(1, 1)) == 1
        real.close()
        assert rejected(again, "edges_mismatch") == 0
    finally:
        again.stop()


# -- item 12: clamped wall times --------------------------------------------------------------------


def test_a_replay_of_frames_stamped_out_of_bounds_counts_each_frame_once(collector: CollectorProcess) -> None:
    frames = [frame(seq, seq, wall_time=1e12) for seq in range(1, 11)]  # far in the future: clamped
    for _ in range(2):  # the agent did not learn they were durable: it replays them all
        agent = OpenStream(collector.grpc_target, hello(JOB))
        for f in frames:
            agent.send(f)
            agent.reply()
        agent.close()
    got = counters(collector)
    assert (got["frames_received_total"], got["frames_duplicate_total"]) == (10, 10), got


# -- item 13: a layer table that changes mid-run ----------------------------------------------------


def test_a_rank_whose_table_changed_while_its_samples_wait_is_refused_and_the_step_merges_whole(
    collector: CollectorProcess,
) -> None:
    a = OpenStream(collector.grpc_target, hello(JOB, rank=0, world_size=2))
    b = OpenStream(collector.grpc_target, hello(JOB, rank=1, world_size=2))
    assert (a.ack(frame(1, 1)), b.ack(frame(1, 1))) == (1, 1)
    assert a.ack(frame(2, 2)) == 2  # step 2 waits for rank 1
    a.close()
    changed = OpenStream(collector.grpc_target, hello(JOB, 3, rank=0, world_size=2))
    changed.send(frame(3, 3, 3))
    call = refusal(changed)
    assert call.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "layer table" in call.details()
    assert b.ack(frame(2, 2)) == 2  # rank 1's step 2 merges with rank 0's, whole
    b.close()
    assert settled(collector, "thermoscope_last_step", 2, job_id=JOB) == 2
    assert rejected(collector, "table_changed") == 1
    again = OpenStream(collector.grpc_target, hello(JOB, 3, rank=0, world_size=2))  # nothing waits now
    assert again.ack(frame(4, 3, 3)) == 4
    again.close()
