"""Shared fixtures: real collectors on loopback, and a scraper for their /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

# Ray reads this when it is imported: 0 makes a local cluster register its node as 127.0.0.1
# (with `_node_ip_address` alone it registers the machine's address, and actors listen there).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from thermoscope.collector.service import Collector
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc
from thermoscope.wire import codec


def thermoscope(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `thermoscope` command as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "thermoscope.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_steps(monitor, model, opt, steps: int, batch: int = 16) -> None:
    """`steps` plain training steps on random inputs (loss: the outputs' mean square), monitored."""
    for _ in range(steps):
        loss = model(torch.randn(batch, model[0].in_features)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, keyed by (name, labels)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, frozenset(labels.items()))]


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """A collector on free loopback ports, on a background thread of this process."""
    db = tmp_path / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", max_message_bytes=256 << 10, db=db).running() as c:
        yield c


class CollectorProcess:
    def __init__(self, grpc_port: int, metrics_port: int, proc: subprocess.Popen) -> None:
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.proc = proc

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s: a test leaves nothing running."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def stalled_collector() -> Iterator[str]:
    """A gRPC server that accepts the Telemetry stream and never reads it (flow control stalls)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def stall(requests, context):
        await asyncio.Event().wait()  # never reads a request, never replies
        yield b""

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "thermoscope.v1.Telemetry", {"Stream": grpc.stream_stream_rpc_method_handler(stall)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def wait_serving(target: str, timeout: float = 20.0) -> None:
    """Poll the standard gRPC health service until it says SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="thermoscope.v1.Telemetry"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"collector at {target} not serving after {timeout} s")
            time.sleep(0.1)


def start_collector_process(
    db: Path, grpc_port: int | None = None, *options: str, metrics_port: int | None = None
) -> CollectorProcess:
    """`thermoscope collector [options]` as its own process, as a user would run it, once it serves."""
    grpc_port, metrics_port = grpc_port or free_port(), metrics_port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "thermoscope.cli",
            "collector",
            "--grpc",
            f"127.0.0.1:{grpc_port}",
            "--metrics",
            f"127.0.0.1:{metrics_port}",
            "--db",
            str(db),
            *options,
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_serving(f"127.0.0.1:{grpc_port}")
    except BaseException:
        proc.kill()
        raise
    return CollectorProcess(grpc_port, metrics_port, proc)


@pytest.fixture
def collector_process(tmp_path: Path) -> Iterator[CollectorProcess]:
    process = start_collector_process(tmp_path / "events.db")
    try:
        yield process
    finally:
        process.stop()


# -- raw protocol helpers: agents written against the contract, without the Monitor ----------------


BINS = 8  # histogram bins the raw-protocol agents declare


def histogram(n_layers: int, per_bin: int = 10) -> np.ndarray:
    """A flat histogram: `per_bin` values in every bin, none outside the edges."""
    hist = np.full((n_layers, BINS + 2), per_bin, dtype=np.int64)
    hist[:, [0, -1]] = 0
    return hist


def site_stats(count: np.ndarray, *moments: np.ndarray) -> SiteStats:
    """Site columns with the probe marked as not run (-1)."""
    return SiteStats(count, *moments, probe_spread=np.full(len(count), -1.0))


def layer_table(n: int, shard: tuple[int, int] = (0, 1), numel: int = 100) -> list[LayerInfo]:
    return [LayerInfo(f"layer{i}", (numel,), numel, "float32", *shard) for i in range(n)]


def hello(
    job: str,
    n_layers: int = 2,
    n_sites: int = 1,
    *,
    rank: int = 0,
    world_size: int = 1,
    layers: list[LayerInfo] | None = None,
    run: str = "r1",
) -> pb.AgentMessage:
    return codec.hello(
        job_id=job,
        run_id=run,
        rank=rank,
        world_size=world_size,
        host="test",
        agent_version="test",
        every=1,
        layers=layers or layer_table(n_layers),
        sites=[SiteInfo(f"site{i}", "ReLU") for i in range(n_sites)],
        bins=BINS,
    )


def sample(step: int, n_layers: int = 2, n_sites: int = 1, energy: float = 1.0, numel: int = 100) -> Sample:
    ones = np.ones(n_layers)
    return Sample(
        step=step,
        wall_time=time.time(),
        energy=energy,
        layers=LayerStats(
            np.full(n_layers, numel, dtype=np.int64),
            0.1 * ones,
            2.0 * ones,
            0.5 * ones,
            0.4 * ones,
            histogram(n_layers),
        ),
        sites=site_stats(np.full(n_sites, 64, dtype=np.int64), *(np.ones(n_sites) for _ in range(4))),
    )


def frame(seq: int, step: int, n_layers: int = 2, n_sites: int = 1, **kw) -> pb.AgentMessage:
    return codec.encode(sample(step, n_layers, n_sites, **kw), seq)


def stream(target: str, messages) -> tuple[list[pb.CollectorMessage], grpc.RpcError | None]:
    """Send `messages` on one Telemetry stream; return the replies and the error, if any."""
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.TelemetryStub(channel).Stream(iter(messages), timeout=15)
        replies: list[pb.CollectorMessage] = []
        try:
            replies.extend(call)
        except grpc.RpcError as exc:
            return replies, exc
        return replies, None


class OpenStream:
    """An agent's stream held open: send messages one at a time and read the replies.

    `config` is the Config that answered the hello. Replies are read by a thread, so that
    `reply` can wait a bounded time; `cancel` breaks the call as a crashed agent would.
    """

    _END = object()

    def __init__(self, target: str, first: pb.AgentMessage) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(first)
        self._inbox: queue.Queue = queue.Queue()
        self._channel = grpc.insecure_channel(target)
        self._call = pb_grpc.TelemetryStub(self._channel).Stream(iter(self._outbox.get, None), timeout=30)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first_reply = self.reply()
        assert first_reply.HasField("config")
        self.config = first_reply.config

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._inbox.put(reply)
        except grpc.RpcError:
            pass
        finally:
            self._inbox.put(self._END)

    def send(self, msg: pb.AgentMessage) -> None:
        self._outbox.put(msg)

    def reply(self, timeout: float = 15.0) -> pb.CollectorMessage:
        """The next reply (queue.Empty if none came within `timeout` s)."""
        item = self._inbox.get(timeout=timeout)
        if item is self._END:
            self._inbox.put(item)
            raise EOFError("the call has ended")
        return item

    def ack(self, msg: pb.AgentMessage) -> int:
        """Send a frame and return the sequence number the collector acknowledged."""
        self.send(msg)
        return self.reply().ack.seq

    def close(self) -> None:
        """Half-close the requests (the agent finished) and read the call to its end."""
        self._outbox.put(None)
        self._reader.join(timeout=15)
        self._channel.close()

    def cancel(self) -> None:
        """Break the call (an agent that crashed or lost its connection)."""
        self._call.cancel()
        self._reader.join(timeout=15)
        self._channel.close()
