"""Real processes as a user runs them: the `thermoscope` command, and collectors on free loopback
ports (the load generator's, `thermoscope.cli.collector_process`)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from thermoscope.cli.collector_process import (
    CollectorProcess,
    free_port,
    start_collector_process,
    stop_process,
    wait_serving,
)
from thermoscope.collector.state.store import EventStore

__all__ = [
    "CollectorProcess",
    "disk_full_at",
    "free_port",
    "start_collector_process",
    "start_full_disk_collector",
    "stop_process",
    "thermoscope",
    "wait_serving",
]


def thermoscope(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the `thermoscope` command as a user would, capturing its output (`env`: variables set
    for it beside this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "thermoscope.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


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
