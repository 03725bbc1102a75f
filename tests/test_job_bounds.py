"""What one client can make the collector hold, and what a job's settings belong to (issue 14).

A hello only proposes a rank's tables; they bind with its first frame, so a stream that never
sends one (a squatter, an agent that died at once) fixes nothing for the job. Each run of a
job has its own state, so a second run never evicts the first, across restarts too. Runs
that ended are let go to make room; one token holds at most its quota; every per-rank table is
bounded, shared between equal ranks and freed when the job ends; an absurd hello or message is
refused before it is read.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from thermoscope.collector.security import Security
from thermoscope.collector.service import Collector
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc
from thermoscope.wire.contract import STREAM_METHOD

from helpers.processes import start_collector_process
from helpers.protocol import OpenStream, frame, hello, layer_table, stream
from helpers.security import TOKEN_A, TOKEN_ANY


def edges(lo: float, hi: float, n: int = 2) -> list:
    """`n` layers like `hello`'s, with histogram edges [lo, hi)."""
    return [layer.__class__(**{**layer.__dict__, "hist_lo": lo, "hist_hi": hi}) for layer in layer_table(n)]


def acks(replies: list[pb.CollectorMessage]) -> list[int]:
    """The frames acknowledged: acks are cumulative (an ack of seq covers every frame up to it)."""
    return list(range(1, max((r.ack.seq for r in replies if r.HasField("ack")), default=0) + 1))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- settings belong to the run that streams --------------------------------------------------------


@pytest.mark.parametrize("restart", [False, True], ids=["live", "after a restart"])
def test_a_hello_that_never_sends_a_frame_binds_nothing_for_the_jobs_real_ranks(
    tmp_path: Path, restart: bool
) -> None:
    db = tmp_path / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db, checkpoint_interval=0.1).running() as c:
        squatter = OpenStream(c.grpc_target, hello("train", layers=edges(-9.0, 9.0)))
        if not restart:
            replies, error = stream(c.grpc_target, [hello("train"), frame(1, 0), frame(2, 1)])
            assert error is None and acks(replies) == [1, 2]
            squatter.send(frame(1, 0))  # too late: the real rank bound the job's edges
            with pytest.raises(EOFError):
                squatter.reply()
            assert "edges" in squatter._call.details()
    if restart:  # the squatter's hello did not survive the restart either: nothing of it was saved
        with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
            replies, error = stream(c.grpc_target, [hello("train"), frame(1, 0), frame(2, 1)])
            assert error is None and acks(replies) == [1, 2]


def test_a_run_that_ended_does_not_bind_the_next_run_of_its_job(collector) -> None:
    first = [hello("reused", layers=edges(-1.0, 1.0), run="monday"), frame(1, 0), frame(2, 1)]
    assert stream(collector.grpc_target, first)[1] is None
    second = [hello("reused", layers=edges(-5.0, 5.0), run="tuesday"), frame(1, 0)]
    replies, error = stream(collector.grpc_target, second)
    assert error is None and acks(replies) == [1]
    job = collector.snapshot()["reused"]
    assert job["ranks"][0]["run_id"] == "tuesday" and job["frames_received"] == 1  # its own counters


def test_a_second_run_after_a_restart_leaves_the_first_runs_restored_state_alone(tmp_path: Path) -> None:
    """A second run of the job says hello (and streams) first after a restart; the first run
    then replays what its spool holds and goes on: each frame counts once, none is lost."""
    db = tmp_path / "events.db"
    frames = [frame(seq, seq - 1) for seq in range(1, 41)]  # a replay resends the very frames
    first = [hello("shared", run="real"), *frames[:20]]
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db, checkpoint_interval=0.1).running() as c:
        assert stream(c.grpc_target, first)[1] is None  # its end checkpoints it
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db, checkpoint_interval=0.1).running() as c:
        other = [hello("shared", run="other"), *(frame(seq, seq - 1) for seq in range(1, 6))]
        assert stream(c.grpc_target, other)[1] is None
        second = c.telemetry.runs.held[("shared", "other")]
        assert (second.frames_received, second.merged_step) == (5, 4)
        replay = [hello("shared", run="real"), *frames]
        replies, error = stream(c.grpc_target, replay)
        assert error is None and acks(replies) == list(range(1, 41))
        real = c.telemetry.runs.held[("shared", "real")]
        assert (real.frames_received, real.frames_duplicate, real.merged_step) == (40, 20, 39)
        assert c.snapshot()["shared"]["frames_received"] == 40  # the run that streams is the job's


# -- bounds on what is held -------------------------------------------------------------------------


def test_runs_that_ended_make_room_and_a_collector_full_of_streaming_runs_refuses() -> None:
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, max_jobs=2).running() as c:
        for job in ("a", "b"):
            assert stream(c.grpc_target, [hello(job), frame(1, 0)])[1] is None
        held = [OpenStream(c.grpc_target, hello(job)) for job in ("c", "d")]  # a, then b, let go
        try:
            assert set(c.snapshot()) == {"c", "d"}
            _, error = stream(c.grpc_target, [hello("e")])
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "all streaming" in error.details()
        finally:
            for s in held:
                s.close()
        assert stream(c.grpc_target, [hello("e"), frame(1, 0)])[1] is None  # c has ended: room again


def test_one_token_cannot_fill_the_collector_for_the_others(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_ANY}\n{TOKEN_A}\n")
    security = Security(tokens=tokens)
    with Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=None, max_jobs=10, max_jobs_per_token=2, security=security
    ).running() as c:
        held = [OpenStream(c.grpc_target, hello(f"greedy-{i}"), metadata=bearer(TOKEN_ANY)) for i in range(2)]
        try:
            channel = grpc.insecure_channel(c.grpc_target)
            call = pb_grpc.TelemetryStub(channel).Stream(
                iter([hello("greedy-2")]), metadata=bearer(TOKEN_ANY), timeout=15
            )
            with pytest.raises(grpc.RpcError) as refused:
                list(call)
            channel.close()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "its token holds" in refused.value.details()
            other = OpenStream(c.grpc_target, hello("modest"), metadata=bearer(TOKEN_A))
            assert other.ack(frame(1, 0)) == 1  # another team's token still streams
            other.close()
        finally:
            for s in held:
                s.close()


def test_equal_rank_tables_are_held_once_and_let_go_when_the_job_ends(collector) -> None:
    world = 16
    ranks = [
        OpenStream(collector.grpc_target, hello("wide", n_layers=200, rank=r, world_size=world))
        for r in range(world)
    ]
    for s in ranks:
        assert s.ack(frame(1, 0, n_layers=200)) == 1
    declared = collector.jobs["wide"].pipeline.declared
    tables = [declared.by_rank[r][0] for r in range(world)]
    assert all(t is tables[0] for t in tables)  # one list for 16 equal tables, not 16 copies
    for s in ranks:
        s.close()
    assert declared.by_rank == {}  # the job ended: its ranks' tables are let go
    assert len(declared.layers) == 200  # its layers by name stay, for /metrics and history


def test_an_absurd_hello_is_refused_from_its_counts_before_its_tables_are_read() -> None:
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, max_layers=100).running() as c:
        huge = pb.AgentMessage()
        huge.CopyFrom(hello("absurd"))
        more = (pb.Layer(name=f"l{i}", numel=1, histogram_lo=-1, histogram_hi=1) for i in range(20_000))
        huge.hello.layers.extend(more)
        _, error = stream(c.grpc_target, [huge])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "a hello of 20002 layers; the limit is 100"
        _, error = stream(c.grpc_target, [pb.AgentMessage(hello=pb.Hello(job_id="x", world_size=10**9))])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "ranks" in error.details()


def _peak_rss(pid: int) -> int:
    """The process' peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def test_grpc_refuses_a_message_far_over_the_limit_before_buffering_it(tmp_path: Path) -> None:
    collector = start_collector_process(tmp_path / "e.db", None, "--max-message-bytes", str(1 << 20))
    try:
        before = _peak_rss(collector.proc.pid)
        blob = b"\x12" + bytes(64 << 20)  # a 64 MiB "message": 64 times the limit

        def send() -> None:
            with grpc.insecure_channel(collector.grpc_target) as channel:
                call = channel.stream_stream(STREAM_METHOD, lambda b: b, None)
                with pytest.raises(grpc.RpcError) as refused:
                    list(call(iter([blob]), timeout=60))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        senders = [threading.Thread(target=send) for _ in range(4)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        assert _peak_rss(collector.proc.pid) - before < 64 << 20  # four 64 MiB messages: none held whole
    finally:
        collector.stop()


def test_an_agent_replaying_from_its_first_frame_after_a_reconnect_counts_nothing_twice(
    tmp_path: Path,
) -> None:
    """Before any checkpoint holds its frames (durable 0), an agent that reconnects replays
    from frame 1: the collector tells that replay (the very frames, their wall times too) from
    a new process of the same run (a restarted worker: new frames, even from the same step)."""
    frames = [frame(seq, seq + 99) for seq in range(1, 16)]
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "e.db", checkpoint_interval=60).running() as c:
        first = OpenStream(c.grpc_target, hello("replay"))
        assert [first.ack(f) for f in frames[:10]] == list(range(1, 11))
        first.cancel()  # the connection broke: no checkpoint made these durable
        replay = [hello("replay"), *frames]
        assert stream(c.grpc_target, replay)[1] is None
        job = c.snapshot()["replay"]
        assert (job["frames_received"], job["frames_late"], job["last_step"]) == (15, 0, 114)
        restarted = [hello("replay"), frame(1, 99), frame(2, 100)]  # a new process: it starts over
        assert stream(c.grpc_target, restarted)[1] is None
        job = c.snapshot()["replay"]
        assert (job["frames_received"], job["frames_late"]) == (17, 2)
