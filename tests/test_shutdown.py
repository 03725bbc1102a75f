"""Graceful shutdown: SIGTERM drains the streams, keeps the database, exits 0; agents move on."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from thermoscope.agent.monitor import Monitor
from thermoscope.collector.service import Collector
from thermoscope.collector.state.store import EventStore
from thermoscope.wire.contract import SERVICE

from helpers.metrics import scrape, value, wait_until
from helpers.processes import free_port, start_collector_process, stop_process, thermoscope
from helpers.protocol import OpenStream, frame, hello
from helpers.training import train_steps

JOB = "shutdown"


def collector_on(db: Path, grpc_port: int, metrics_port: int) -> subprocess.Popen:
    """A collector on fixed ports (its successor takes the same), keeping every merged reading."""
    return start_collector_process(db, grpc_port, "--history-interval", "0", metrics_port=metrics_port).proc


class HealthWatch(threading.Thread):
    """Polls the health service's Check and records every distinct status it answered."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.seen: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.done.is_set():
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=0.5).status
                    if not self.seen or self.seen[-1] != status:
                        self.seen.append(status)
                except grpc.RpcError:
                    pass
                time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_drains_exits_zero_and_the_agent_moves_to_the_successor(tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    first_db, second_db = tmp_path / "first.db", tmp_path / "second.db"
    first = collector_on(first_db, grpc_port, metrics_port)
    second = None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, opt, collector=target, job=JOB, every=1)
    training = threading.Event()
    training.set()

    def train() -> None:
        while training.is_set():
            train_steps(monitor, model, opt, 1)
            time.sleep(0.005)

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    watch = HealthWatch(target)
    try:
        wait_until(lambda: monitor.delivered >= 30, 30, "the first collector got no frames")
        metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(metrics, "thermoscope_rank_lost_total", job_id=JOB) == 0
        watch.start()
        time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
        watch.done.set()
        watch.join(timeout=5)
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert watch.seen[:2] == [serving, not_serving], watch.seen
        delivered_at_stop = monitor.delivered

        # the database is intact: closed cleanly, readable by the commands that read it
        store = EventStore(first_db, create=False)
        try:
            assert len(store.history(JOB).step) > 0
        finally:
            store.close()
        listed = thermoscope("events", "--db", str(first_db), "--json")
        assert listed.returncode == 0, listed.stderr

        # a successor on the same ports: the same agent, still training, streams to it
        second = collector_on(second_db, grpc_port, metrics_port)
        wait_until(
            lambda: monitor.delivered > delivered_at_stop + 10,
            30,
            f"the agent did not reconnect (last error: {monitor.last_error})",
        )
        metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(metrics, "thermoscope_frames_received_total", job_id=JOB) > 0
        assert value(metrics, "thermoscope_rank_lost_total", job_id=JOB) == 0
    finally:
        watch.done.set()
        training.clear()
        trainer.join(timeout=10)
        monitor.close(timeout=5)
        stop_process(first)
        if second is not None:
            stop_process(second)
    sender = monitor.sink
    assert sender.submitted == sender.delivered + sender.dropped


def test_stop_ends_open_streams_cleanly_not_as_lost_ranks(tmp_path: Path) -> None:
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "events.db").running() as c:
        agent = OpenStream(c.grpc_target, hello(JOB))
        assert agent.ack(frame(1, step=1)) == 1
        assert agent.ack(frame(2, step=2)) == 2
    # leaving the block stopped the collector: the stream got its last ack, then ended with OK
    assert agent.reply().ack.seq == 2
    with pytest.raises(EOFError):
        agent.reply()
    agent.close()
    job = c.jobs[JOB]
    assert job.ranks.lost_total == 0
    assert 0 in job.ranks.finished and not job.ranks.lost
