"""The agent never breaks training, survives `fork`, and tells the truth about delivery.

A spool that cannot be made or written is given up, logged once, and streaming goes on; a
collector whose commits fail leaves `close()` False with the frames it applied and never made
durable counted (`undurable`, checked against what its database really holds); a frame the
spool evicted after the collector took it is delivered, not dropped; a forked child of a
streaming process (a DataLoader worker) has an inert monitor that never touches gRPC, and its
parent streams on.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thermoscope.agent import Monitor
from thermoscope.collector.service import Collector
from thermoscope.collector.state.store import EventStore

from helpers.metrics import scrape, value
from helpers.processes import start_full_disk_collector
from helpers.training import small_model, train_steps

JOB = "reliability"
SPOOL_FAILED = "the spool failed"


def spool_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if SPOOL_FAILED in r.getMessage()]


def test_a_spool_directory_that_cannot_be_made_is_given_up_and_every_step_still_streams(
    collector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The spool's directory would be under a regular file (mkdir fails even as root): training
    runs, every sampled step reaches the collector, the failure is logged once and kept."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    model, opt = small_model()
    monitor = Monitor(model, opt, collector=collector.grpc_target, job=JOB, every=1, spool=blocker / "spool")
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        train_steps(monitor, model, opt, 30)
        closed = monitor.close(timeout=20)
    assert closed is True
    assert (monitor.delivered, monitor.dropped, monitor.undurable) == (30, 0, 0)
    assert "NotADirectoryError" in monitor.spool_error
    assert len(spool_failures(caplog)) == 1, spool_failures(caplog)
    assert collector.snapshot()[JOB]["frames_received"] == 30


def test_a_full_disk_under_the_spool_never_raises_out_of_step_or_close(
    collector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The spool's file is /dev/full (every write fails with ENOSPC, as on a full disk): `step`
    and `close` return, the failure is logged once, and the frames stream without the spool."""
    spool = tmp_path / "spool"
    spool.mkdir()
    # the spool's one file per process is named for job, run, rank and pid (Spool.of_process)
    (spool / f"{JOB}-full-0-{os.getpid()}.spool").symlink_to("/dev/full")
    model, opt = small_model()
    monitor = Monitor(model, opt, collector=collector.grpc_target, job=JOB, run="full", every=1, spool=spool)
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        train_steps(monitor, model, opt, 30)
        closed = monitor.close(timeout=20)
    assert closed is True
    assert (monitor.delivered, monitor.dropped) == (30, 0)
    assert "No space left on device" in monitor.spool_error
    assert len(spool_failures(caplog)) == 1, spool_failures(caplog)
    assert collector.snapshot()[JOB]["frames_received"] == 30


@pytest.mark.slow
def test_a_collector_whose_commits_fail_leaves_close_false_and_counts_what_is_not_durable(
    tmp_path: Path,
) -> None:
    """A real collector process whose database cannot grow past a few checkpoints keeps acking
    (it applied the frames) while its commits fail. The agent keeps every frame above the last
    durable mark in its spool, and `close()` is False with `undurable` equal to what the
    collector's database does not hold."""
    steps = 300
    db = tmp_path / "events.db"
    collector = start_full_disk_collector(db, tmp_path / "collector.log")
    model, opt = small_model()
    monitor = Monitor(model, opt, collector=collector.grpc_target, job=JOB, every=1, spool=tmp_path / "spool")
    sender = monitor.sink
    try:
        train_steps(monitor, model, opt, steps)
        assert monitor.flush(timeout=60)
        spooled = [seq for seq, _ in sender._spool.frames()]
        durable = sender.durable
        closed = monitor.close(timeout=20)
    finally:
        collector.stop()
    assert spooled == list(range(durable + 1, steps + 1))  # every frame above the durable mark, kept
    assert closed is False
    assert (monitor.delivered, monitor.dropped) == (steps, 0)  # all applied: none dropped ...
    persisted = len(EventStore(db, create=False).history(JOB).step) if durable else 0
    assert 0 < monitor.undurable == steps - persisted  # ... and what was not made durable, counted
    assert "checkpoint to" in (tmp_path / "collector.log").read_text()  # its commits did fail


def test_a_collector_without_a_database_is_done_when_it_applied_every_frame(tmp_path: Path) -> None:
    """No `Ack.durable` (nothing persists): applied is all there is, and `close()` is True."""
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None).running() as c:
        model, opt = small_model()
        monitor = Monitor(model, opt, collector=c.grpc_target, job=JOB, every=1, spool=tmp_path / "spool")
        train_steps(monitor, model, opt, 20)
        assert monitor.close(timeout=20) is True
    assert (monitor.delivered, monitor.dropped, monitor.undurable) == (20, 0, 0)


def test_a_frame_evicted_from_the_spool_after_it_was_sent_is_delivered_not_dropped(
    collector, tmp_path: Path
) -> None:
    """A spool bound below one frame evicts each frame as the next is kept, mostly before its ack
    comes: the collector still applied every one, so none is dropped."""
    model, opt = small_model()
    monitor = Monitor(
        model, opt, collector=collector.grpc_target, job=JOB, every=1, spool=tmp_path / "spool", spool_bytes=1
    )
    train_steps(monitor, model, opt, 50)
    assert monitor.close(timeout=20)
    assert collector.snapshot()[JOB]["frames_received"] == 50
    assert (monitor.delivered, monitor.dropped) == (50, 0)
    assert monitor.undurable == 0


FORKS = 20
TESTS = str(Path(__file__).parent)  # the script imports `helpers`

# Forks FORKS children off a process whose monitor streams (its sender thread and gRPC's threads
# busy); each child steps and closes its inherited monitor, then exits 0 if the monitor stayed
# inert (no thread started: nothing touched gRPC) and 3 if not. A child that hangs is killed.
FORKING = """
import json, os, signal, sys, threading, time
import torch
from thermoscope.agent import Monitor
from helpers.training import small_model, train_steps

model, opt = small_model()
monitor = Monitor(model, opt, collector=sys.argv[1], job=sys.argv[2], every=1)
train_steps(monitor, model, opt, 5)
statuses = []
for _ in range(int(sys.argv[3])):
    train_steps(monitor, model, opt, 1)  # a frame on its way while we fork
    pid = os.fork()
    if pid == 0:
        for _ in range(3):
            monitor.step(torch.tensor(1.0))
        closed = monitor.close(timeout=2.0)
        inert = threading.active_count() == 1 and closed and monitor.delivered == monitor.dropped == 0
        os._exit(0 if inert else 3)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # hung: it reads -9
        time.sleep(0.01)
    statuses.append(os.waitstatus_to_exitcode(status))  # -11: it crashed
train_steps(monitor, model, opt, 10)
closed = monitor.close(timeout=20)
print(json.dumps({"children": statuses, "closed": closed, "delivered": monitor.delivered,
                  "dropped": monitor.dropped}))
"""


def test_forked_children_of_a_streaming_monitor_are_inert_and_the_parent_streams_on(collector) -> None:
    """With grpc's fork support off (its default), every child exits 0 (no crash, no hang) with a
    monitor that touched nothing, and the parent delivers every sampled step, once."""
    job = f"{JOB}-forks"
    result = subprocess.run(
        [sys.executable, "-c", FORKING, collector.grpc_target, job, str(FORKS)],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "GRPC_ENABLE_FORK_SUPPORT": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.splitlines()[-1])
    assert run["children"] == [0] * FORKS, result.stderr[-3000:]
    sampled = 5 + FORKS + 10
    assert (run["closed"], run["delivered"], run["dropped"]) == (True, sampled, 0)
    metrics = scrape(collector.metrics_url)
    assert value(metrics, "thermoscope_frames_received_total", job_id=job) == sampled
    assert value(metrics, "thermoscope_frames_duplicate_total", job_id=job) == 0  # no child's frame came
