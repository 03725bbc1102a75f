"""`thermoscope collector` as its own process on free loopback ports, as a user runs it: started,
waited for until its health service says SERVING, stopped.

The load generator starts its collectors so (`loadgen.py`, `loadgen_nodes.py`), and so do the
tests (tests/helpers/processes.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from thermoscope.wire.contract import SERVICE


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s: nothing is left running."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def wait_serving(target: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Poll the standard gRPC health service until it says SERVING (and fail at once if `proc`,
    the server's process, exits first). The collector serves /metrics before it says so."""
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
    """A `thermoscope collector` process: its addresses, `wait_serving`, `stop`."""

    def __init__(self, grpc_port: int, metrics_port: int, proc: subprocess.Popen) -> None:
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.proc = proc

    @classmethod
    def launch(
        cls,
        db: Path,
        *options: str,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        global_options: Sequence[str] = (),
        python_options: Sequence[str] = (),
        **popen,
    ) -> CollectorProcess:
        """`python [python_options] -m thermoscope.cli [global_options] collector [options]` on
        the given loopback ports (None: a free one), not yet serving (`wait_serving`), so that
        several start at once; `popen` goes to subprocess.Popen (e.g. where its output goes)."""
        grpc_port, metrics_port = grpc_port or free_port(), metrics_port or free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                *python_options,
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
        return cls(grpc_port, metrics_port, proc)

    def wait_serving(self, timeout: float = 20.0) -> None:
        """Return once it serves; kill it and raise if it exits first or is not serving within
        `timeout` s."""
        try:
            wait_serving(self.grpc_target, timeout, self.proc)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)


def start_collector_process(
    db: Path,
    grpc_port: int | None = None,
    *options: str,
    metrics_port: int | None = None,
    global_options: Sequence[str] = (),
    ready_timeout: float = 20.0,
    **popen,
) -> CollectorProcess:
    """`CollectorProcess.launch`, once it serves (within `ready_timeout` s)."""
    collector = CollectorProcess.launch(
        db, *options, grpc_port=grpc_port, metrics_port=metrics_port, global_options=global_options, **popen
    )
    collector.wait_serving(ready_timeout)
    return collector
