"""A frame is durable only when the commit of its checkpoint succeeded: with the collector's disk
full, acks stop saying more is durable and health says NOT_SERVING; once the disk frees, a
restart on the same database has every frame and every event."""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from thermoscope.collector.service import Collector
from thermoscope.collector.state.store import EventStore
from thermoscope.wire import codec
from thermoscope.wire.contract import SERVICE

from helpers import checkpoint_cases
from helpers.processes import free_port, start_collector_process, stop_process, wait_serving
from helpers.protocol import OpenStream

JOB, STEPS, FULL_AT = checkpoint_cases.JOB, 180, 60
#: A collector whose writes past a file size cap fail with EFBIG, as on a full disk (SIGXFSZ,
#: which would kill it, ignored); the test sets and lifts the cap with prlimit.
CAPPED = (
    "import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "from thermoscope.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def _hello():
    h = checkpoint_cases.hello(0)
    h.hello.world_size = 1
    return h


def _frame(step: int):
    return codec.encode(checkpoint_cases.sample(0, step), step + 1)


def _committed(db: Path) -> int:
    """The seq the database's committed marks hold for the run (0: none)."""
    with closing(sqlite3.connect(db, timeout=10)) as con:
        try:
            row = con.execute("SELECT seq FROM marks WHERE job = ?", (JOB,)).fetchone()
        except sqlite3.OperationalError:
            return 0
    return 0 if row is None else row[0]


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
        )
    return reply.status


def _until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def _reference_events(tmp_path: Path) -> list[dict]:
    """The events these frames make on a collector whose disk never fills."""
    db = tmp_path / "reference.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db, history_interval=0).running() as c:
        s = OpenStream(c.grpc_target, _hello())
        for step in range(STEPS + 1):
            s.ack(_frame(step))
        s.close()
    store = EventStore(db, create=False)
    events = [e.as_dict() for e in store.query(job=JOB)]
    store.close()
    return events


def test_with_the_disk_full_nothing_is_acked_durable_health_fails_and_a_restart_loses_nothing(
    tmp_path: Path,
) -> None:
    db, port = tmp_path / "events.db", free_port()
    args = [
        "collector",
        "--grpc",
        f"127.0.0.1:{port}",
        "--metrics",
        f"127.0.0.1:{free_port()}",
        "--db",
        str(db),
    ]
    # (its frames are stamped in 2023, `checkpoint_cases.EPOCH`: the default retention would prune them)
    args += ["--checkpoint-interval", "0.2", "--history-interval", "0", "--retention", "0"]
    proc = subprocess.Popen([sys.executable, "-c", CAPPED, *args], stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, 30, proc)
        agent = OpenStream(target, _hello())
        for step in range(FULL_AT):
            agent.ack(_frame(step))
        _until(lambda: _committed(db) == FULL_AT, "a checkpoint holds the first frames")
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))  # the disk is full
        durable = []
        for step in range(FULL_AT, STEPS):
            agent.send(_frame(step))
            durable.append(agent.reply().ack.durable)
            time.sleep(0.01)  # checkpoints try (and fail) meanwhile
        _until(lambda: _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING")
        agent.send(_frame(STEPS))
        durable.append(agent.reply().ack.durable)
        assert set(durable) == {FULL_AT}  # no ack said more was durable while no commit succeeded
        assert _committed(db) == FULL_AT
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        _until(lambda: _health(target) == health_pb2.HealthCheckResponse.SERVING, "health SERVING again")
        _until(lambda: _committed(db) == STEPS + 1, "a checkpoint holds every frame")
        agent.close()
    finally:
        stop_process(proc)
    log = proc.stderr.read()
    assert "failed, agents keep their frames" in log and "succeeded again" in log
    second = start_collector_process(db, None, "--retention", "0")  # a restart: everything is there
    second.stop()
    store = EventStore(db, create=False)
    steps, events = store.history(JOB).step.tolist(), [e.as_dict() for e in store.query(job=JOB)]
    store.close()
    assert steps == list(range(STEPS + 1))
    assert events == _reference_events(tmp_path) and events
    assert os.path.getsize(db) > 0
