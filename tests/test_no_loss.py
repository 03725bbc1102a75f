"""No data loss: the agent's spool and the collector's de-duplication across a `kill -9`."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.agent.spool import MAGIC, Spool
from thermoscope.collector.ingest.server import Telemetry
from thermoscope.collector.service import Collector
from thermoscope.collector.state.store import EventStore
from thermoscope.wire import codec

from helpers.metrics import scrape, value
from helpers.processes import free_port, start_collector_process, stop_process
from helpers.protocol import OpenStream, frame, hello
from helpers.training import train_steps

JOB = "no-loss"


def _frames(metrics_url: str) -> tuple[float, float]:
    m = scrape(metrics_url)
    return tuple(
        value(m, f"thermoscope_frames_{what}_total", job_id=JOB) for what in ("received", "duplicate")
    )


@pytest.mark.slow
def test_kill_9_collector_mid_run_loses_no_frame_and_counts_none_twice(tmp_path: Path) -> None:
    """A real collector process is SIGKILLed while a real training loop streams to it with a
    spool, after one checkpoint and with frames applied since; training goes on, a new
    collector process starts on the same ports and database, resumes from the checkpoint,
    and every sampled step ends up merged exactly once."""
    torch.manual_seed(0)
    db, grpc_port = tmp_path / "events.db", free_port()
    first = start_collector_process(db, grpc_port, "--history-interval", "0", "--checkpoint-interval", "1")
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(
        model,
        opt,
        collector=first.grpc_target,
        job=JOB,
        every=1,
        spool=tmp_path / "spool",
        spool_bytes=4 << 20,
    )
    second = None
    sender = monitor.sink
    try:
        train_steps(monitor, model, opt, 40)
        assert monitor.flush(timeout=20)
        time.sleep(1.5)  # a checkpoint makes these 40 durable; the agent learns it with its next ack
        train_steps(monitor, model, opt, 20)
        deadline = time.monotonic() + 20
        while monitor.delivered < 50 and time.monotonic() < deadline:
            time.sleep(0.005)
        durable, accepted = sender.durable, monitor.delivered
        os.kill(first.proc.pid, signal.SIGKILL)  # frames in flight, some applied and not checkpointed
        first.proc.wait(timeout=10)
        assert 40 <= durable < accepted  # the restarted collector needs the spool for the frames after it
        train_steps(monitor, model, opt, 20)  # the collector is gone: queued or spooled
        deadline = time.monotonic() + 20
        while sender.connected and time.monotonic() < deadline:
            time.sleep(0.005)  # until the broken stream ended: the acks it carried are taken
        assert not sender.connected
        believed = sender.durable  # the agent replays every frame after it
        store = EventStore(db, create=False)
        [(checkpointed, _)] = store.load_run(JOB, monitor.run)[0].values()  # the restart resumes here
        store.close()
        second = start_collector_process(db, grpc_port, "--history-interval", "0")
        train_steps(monitor, model, opt, 40)
        assert monitor.flush(timeout=60)
        received, duplicate = _frames(second.metrics_url)
    finally:
        monitor.close()
        stop_process(first.proc)
        if second is not None:
            second.stop()
    assert monitor.dropped == 0
    assert monitor.delivered == 120
    history = EventStore(db, create=False).history(JOB)
    assert history.step.tolist() == list(range(120))  # every sampled step, once, no gap
    assert received == 120  # applied once each (a late re-application would count here too)
    # the replays the restarted collector drops are the frames the killed one had checkpointed
    # without the agent learning it; those after its checkpoint died with it and are applied
    assert believed <= checkpointed and duplicate == checkpointed - believed
    assert not list((tmp_path / "spool").iterdir())  # a closed monitor leaves no spool behind


def test_spool_bound_evicts_the_oldest_and_says_how_far(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool", max_bytes=250)
    evicted = []
    for seq in range(1, 6):
        spool.append(seq, bytes([seq]) * 100)
        evicted.append(spool.evicted)
    assert evicted == [0, 0, 1, 2, 3]  # 250 bytes hold two 100-byte frames
    assert [seq for seq, _ in spool.frames()] == [4, 5]
    assert spool.frames(4) == [(5, bytes([5]) * 100)]
    spool.ack(4)
    assert len(spool) == 1
    spool.append(6, b"x" * 1000)  # the newest is kept, however large
    assert spool.frames() == [(6, b"x" * 1000)] and spool.evicted == 5
    spool.clear()
    assert spool.path.read_bytes() == MAGIC + bytes(12)  # nothing held: cut back to its (empty) hello
    spool.close()
    assert not spool.path.exists()


def test_sender_counts_spool_overflow_as_dropped(collector, tmp_path: Path) -> None:
    """A spool bound below one frame holds only the newest: the frames it evicts before
    their ack are counted dropped, so that submitted == delivered + dropped still holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(
        model, opt, collector=collector.grpc_target, job=JOB, every=1, spool=tmp_path / "spool", spool_bytes=1
    )
    train_steps(monitor, model, opt, 50)
    assert monitor.close(timeout=20)
    assert monitor.delivered + monitor.dropped == 50
    assert collector.snapshot()[JOB]["frames_received"] == 50  # evicted after it was sent: it still arrived


def test_replays_are_acknowledged_not_applied_across_reconnects_and_restarts(tmp_path: Path) -> None:
    """Raw protocol: frames replayed on a new stream, to the same collector or to a new one on
    the same database, are acknowledged and counted as duplicates; only new ones are applied."""
    db = tmp_path / "events.db"
    with Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=db, history_interval=0, checkpoint_interval=600
    ).running() as c:
        s = OpenStream(c.grpc_target, hello(JOB))
        assert [s.ack(frame(seq, seq - 1)) for seq in (1, 2, 3)] == [1, 2, 3]
        s.cancel()  # the acks of 2 and 3 were "lost": the agent replays them
        s = OpenStream(c.grpc_target, hello(JOB))
        assert [s.ack(frame(seq, seq - 1)) for seq in (2, 3, 4, 5)] == [2, 3, 4, 5]
        s.close()
        job = c.snapshot()[JOB]
        assert (job["frames_received"], job["last_step"]) == (5, 4)
        assert value(scrape(c.metrics_url), "thermoscope_frames_duplicate_total", job_id=JOB) == 2
    with Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=db, history_interval=0, checkpoint_interval=600
    ).running() as c:
        s = OpenStream(c.grpc_target, hello(JOB))
        assert [s.ack(frame(seq, seq - 1)) for seq in (4, 5, 6, 7)] == [4, 5, 6, 7]
        s.close()
        job = c.snapshot()[JOB]
        assert (job["frames_received"], job["last_step"], job["frames_late"]) == (7, 6, 0)
        assert value(scrape(c.metrics_url), "thermoscope_frames_duplicate_total", job_id=JOB) == 4
        s = OpenStream(c.grpc_target, hello(JOB))  # a new process of the same run: numbered from 1 again
        assert s.ack(frame(1, 7)) == 1
        s.close()
        assert c.snapshot()[JOB]["last_step"] == 7
        assert c.store.history(JOB).step.tolist() == list(range(8))


def test_acks_say_how_far_the_stream_is_durable(tmp_path: Path) -> None:
    """Each ack carries the highest seq the collector's last checkpoint persisted: nothing before
    the first checkpoint, the frames applied before it after; without a database, no such field."""
    with Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "e.db", checkpoint_interval=0.3
    ).running() as c:
        s = OpenStream(c.grpc_target, hello(JOB))
        s.send(frame(1, 0))
        first = s.reply().ack
        time.sleep(0.7)  # at least one checkpoint
        s.send(frame(2, 1))
        second = s.reply().ack
        s.close()
    assert (first.seq, first.HasField("durable"), first.durable) == (1, True, 0)
    assert (second.seq, second.durable) == (2, 1)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None).running() as c:
        s = OpenStream(c.grpc_target, hello(JOB))
        s.send(frame(1, 0))
        ack = s.reply().ack
        s.close()
    assert (ack.seq, ack.HasField("durable")) == (1, False)


def test_spool_keeps_frames_in_seq_order_whoever_appends_first(tmp_path: Path) -> None:
    """A stream's request thread and the sender thread between streams may append a moment out
    of order; replays still come in seq order."""
    spool = Spool(tmp_path / "s.spool", max_bytes=1 << 20)
    for seq in (1, 3, 2, 4):
        spool.append(seq, bytes([seq]))
    assert spool.evicted == 0
    assert spool.frames() == [(seq, bytes([seq])) for seq in (1, 2, 3, 4)]
    spool.close()


@pytest.mark.slow
def test_an_outage_longer_than_the_queue_is_spooled_and_replayed_below_the_rate_limit(tmp_path: Path) -> None:
    """With the collector down, the sender spills what the queue (16 frames here) cannot hold into
    the spool; once a collector limited to 20 frames/s comes up, the 60 frames are replayed
    paced below that limit: none dropped, none refused."""
    torch.manual_seed(0)
    port = free_port()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(
        model, opt, collector=f"127.0.0.1:{port}", job=JOB, every=1, max_queue=16, spool=tmp_path / "spool"
    )
    try:
        for _ in range(6):  # 60 steps over ~1.2 s of outage: the sender spools between its retries
            train_steps(monitor, model, opt, 10)
            time.sleep(0.2)
        with Collector(
            f"127.0.0.1:{port}", "127.0.0.1:0", db=tmp_path / "e.db", max_frame_rate=20
        ).running() as c:
            began = time.monotonic()
            assert monitor.flush(timeout=30)
            took = time.monotonic() - began
            metrics = scrape(c.metrics_url)
            received = c.snapshot()[JOB]["frames_received"]
    finally:
        monitor.close()
    assert (monitor.dropped, monitor.delivered, received) == (0, 60, 60)
    assert ("thermoscope_frames_rejected_total", frozenset({("reason", "rate_limited")})) not in metrics
    assert took > (60 - 20) / 20  # paced: beyond the bucket's one second of frames, at < 20/s


def test_a_job_id_back_for_another_run_does_not_inherit_the_old_runs_state(tmp_path: Path) -> None:
    """Ray numbers jobs per cluster: a new cluster's first job reuses an old one's id. The same
    agent run resumes its job's state; another run of the same job id starts afresh."""
    db = tmp_path / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        s = OpenStream(c.grpc_target, hello(JOB, run="first"))
        assert [s.ack(frame(seq, seq - 1)) for seq in (1, 2, 3)] == [1, 2, 3]
        s.close()
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        s = OpenStream(c.grpc_target, hello(JOB, run="second"))
        assert s.ack(frame(1, 0)) == 1
        s.close()
        assert c.snapshot()[JOB]["frames_received"] == 1  # not 4: nothing of run "first" carried over
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        s = OpenStream(c.grpc_target, hello(JOB, run="second"))
        assert s.ack(frame(2, 1)) == 2
        s.close()
        assert c.snapshot()[JOB]["frames_received"] == 2  # its own run's state resumed


@pytest.mark.slow
def test_a_checkpoint_the_database_refuses_is_rolled_back_and_retried(tmp_path: Path, caplog) -> None:
    """A database that refuses writes (as a full disk would) moves no durable mark and is logged
    once; once it takes writes again, the next checkpoint saves everything since."""
    collector = Collector(
        "127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "e.db", checkpoint_interval=0.1, history_interval=0
    )
    with collector.running() as c:
        s = OpenStream(c.grpc_target, hello(JOB))

        def durable_after(seq: int) -> int:
            time.sleep(0.4)  # a few checkpoints
            s.send(frame(seq, seq - 1))
            return s.reply().ack.durable

        assert durable_after(1) == 0 and durable_after(2) == 1
        c.store._db.execute("PRAGMA query_only = ON")  # every write now fails
        stuck = durable_after(3)
        assert stuck in (1, 2)  # (2 if a checkpoint came between the ack of 2 and the failure)
        assert durable_after(4) == stuck
        c.store._db.execute("PRAGMA query_only = OFF")
        assert durable_after(5) == 4
        s.close()
        assert c.store.history(JOB).step.tolist() == [0, 1, 2, 3, 4]
    assert sum("checkpoint to" in r.message and "failed" in r.message for r in caplog.records) == 1


def test_a_checkpoint_cancelled_midway_is_rolled_back_and_written_whole_by_the_next(tmp_path: Path) -> None:
    """A collector that stops while a checkpoint is between two jobs' saves (its task is
    cancelled) leaves nothing half-written: the next checkpoint writes every job once."""
    store = EventStore(tmp_path / "e.db", history_interval=0)
    telemetry = Telemetry({}, store=store)
    for job in ("a", "b"):
        run, s = telemetry.intake.open(hello(job).hello, tenant="")
        for seq in (1, 2, 3):
            s.last_seq = seq
            msg = frame(seq, seq - 1).frame
            run.accept(s, codec.decode(msg, len(s.layers), len(s.sites), s.bins))

    async def stop_midway_then_checkpoint() -> None:
        first = asyncio.create_task(telemetry.checkpointer.checkpoint())
        while not telemetry.checkpointer.written:
            await asyncio.sleep(0)  # until the first job is saved, the second not yet committed
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await telemetry.checkpointer.checkpoint()

    asyncio.run(stop_midway_then_checkpoint())
    for job in ("a", "b"):
        assert store.history(job).step.tolist() == [0, 1, 2]  # once each: the first save rolled back
        assert telemetry.jobs[job].durable(telemetry.jobs[job].ranks.streams[0]) == 3
    store.close()
