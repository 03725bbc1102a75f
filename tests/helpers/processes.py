"""Real processes as a user runs them: the `thermoscope` command, and collectors on free loopback ports."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from thermoscope.collector.store import EventStore
from thermoscope.wire.contract import SERVICE


def thermoscope(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `thermoscope` command as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "thermoscope.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disk_full_at(limit: int) -> None:
    """In a child process, before it runs (`preexec_fn`): files may not grow past `limit` bytes
    (EFBIG, a full disk to sqlite), and the signal the kernel sends with it is ignored."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def start_full_disk_collector(db: Path, log: Path, room: int = 64 << 10) -> CollectorProcess:
    """A collector process (checkpoints every 0.2 s, no history thinning) whose database may
    grow `room` bytes past its schema: then its commits fail as on a full disk. Its output goes
    to `log` (a regular file obeys the limit too: keep it small)."""
    EventStore(db).close()  # the schema, before the limit
    with open(log, "w") as out:
        return start_collector_process(
            db,
            None,
            "--history-interval",
            "0",
            "--checkpoint-interval",
            "0.2",
            preexec_fn=lambda: disk_full_at(db.stat().st_size + room),
            stdout=out,
            stderr=out,
        )


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s: a test leaves nothing running."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def wait_serving(target: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Poll the standard gRPC health service until it says SERVING (and fail at once if `proc`,
    the server's process, exits first)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"collector exited with status {proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"collector at {target} not serving after {timeout} s")
            time.sleep(0.1)


class CollectorProcess:
    """A `thermoscope collector` process: its addresses, and `stop`."""

    def __init__(self, grpc_port: int, metrics_port: int, proc: subprocess.Popen) -> None:
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.proc = proc

    def stop(self) -> None:
        stop_process(self.proc)


def start_collector_process(
    db: Path,
    grpc_port: int | None = None,
    *options: str,
    metrics_port: int | None = None,
    global_options: tuple[str, ...] = (),
    ready_timeout: float = 20.0,
    **popen,
) -> CollectorProcess:
    """`thermoscope [global_options] collector [options]` as its own process, as a user would run
    it, once it serves (within `ready_timeout` s); `popen` goes to subprocess.Popen (e.g. where its
    output goes)."""
    grpc_port, metrics_port = grpc_port or free_port(), metrics_port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "thermoscope.cli",
            *global_options,
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
        **popen,
    )
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", ready_timeout, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return CollectorProcess(grpc_port, metrics_port, proc)
