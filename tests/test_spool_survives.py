"""A spool is a disk buffer: what the collector did not make durable outlives the process.

Before, a monitor whose collector's disk was full reported `close()` False and "208 frames ... not
made durable", and then emptied its spool: a restarted collector held 92 of 300 sampled steps.
Now the spool keeps every frame the collector has not made durable (and those it never took), the
next monitor given the same directory replays them on its first stream, and so does `thermoscope
replay`; the collector's de-duplication counts each frame once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from thermoscope.agent import Monitor
from thermoscope.agent.spool import MAGIC, Spool, SpoolError
from thermoscope.collector.state.store import EventStore
from thermoscope.wire import codec

from helpers.processes import start_collector_process, start_full_disk_collector, thermoscope
from helpers.training import small_model, train_steps

JOB, STEPS = "survivor", 300


def hello(job: str = JOB) -> object:
    return codec.hello(
        job_id=job,
        run_id="r",
        rank=0,
        world_size=1,
        host="h",
        agent_version="t",
        every=1,
        layers=[],
        sites=[],
        bins=8,
    )


# -- the file -------------------------------------------------------------------------------------


def test_a_live_spool_is_nobodys_leftover_and_a_kept_one_is_adopted_whole(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, hello(), max_bytes=1 << 20)
    for seq in (1, 2, 3):
        spool.append(seq, b"frame %d" % seq)
    assert Spool.leftovers(tmp_path) == []  # its process lives and holds it
    with pytest.raises(BlockingIOError):
        Spool.adopt(spool.path)
    spool.ack(1)
    spool.close(keep=True)
    assert Spool.leftovers(tmp_path) == [spool.path]
    adopted = Spool.adopt(spool.path)
    assert adopted.hello == hello().SerializeToString()
    assert adopted.frames() == [(2, b"frame 2"), (3, b"frame 3")]  # the durable one is gone
    assert Spool.leftovers(tmp_path) == []  # adopted: held again
    adopted.close()
    assert not spool.path.exists()


def test_a_spool_with_nothing_left_is_removed_at_close(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, hello(), max_bytes=1 << 20)
    spool.append(1, b"x")
    spool.ack(1)
    spool.close(keep=True)
    assert list(tmp_path.iterdir()) == []


KILLED = """
import os, struct, sys
from thermoscope.agent.spool import Spool
from thermoscope.wire import codec
spool = Spool.create(sys.argv[1], codec.hello(job_id="k", run_id="r", rank=0, world_size=1, host="h",
                     agent_version="t", every=1, layers=[], sites=[], bins=8), max_bytes=1 << 20)
for seq in range(1, 11):
    spool.append(seq, bytes([seq]) * 1000)
spool._file.write(struct.pack("<QI", 11, 1000) + bytes(20))  # cut short: it dies writing it
spool._file.flush()
os.kill(os.getpid(), 9)
"""


def test_the_spool_of_a_process_killed_mid_write_is_adopted_up_to_its_last_whole_record(
    tmp_path: Path,
) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    (path,) = Spool.leftovers(tmp_path)  # its lock died with it
    adopted = Spool.adopt(path)
    assert [seq for seq, _ in adopted.frames()] == list(range(1, 11))
    adopted.close(keep=True)


def test_a_file_that_is_not_a_spool_is_refused_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "old.spool"
    path.write_bytes(b"\x01" + bytes(30))  # an earlier release's spool: no header, no hello
    with pytest.raises(SpoolError, match="not a spool of this release"):
        Spool.adopt(path)
    path.write_bytes(MAGIC)
    with pytest.raises(SpoolError, match="no hello"):
        Spool.adopt(path)
    assert path.exists()  # refused, never removed


def test_a_dead_process_with_the_same_pid_leaves_its_spool_aside_not_overwritten(tmp_path: Path) -> None:
    """A restarted container's training process often has the pid its predecessor had."""
    first = Spool.create(tmp_path, hello(), max_bytes=1 << 20)
    first.append(1, b"kept")
    first.close(keep=True)
    second = Spool.create(tmp_path, hello(), max_bytes=1 << 20)
    (leftover,) = Spool.leftovers(tmp_path)
    assert leftover != second.path
    adopted = Spool.adopt(leftover)
    assert adopted.frames() == [(1, b"kept")]
    adopted.close(keep=True)
    second.close()


# -- a full disk, a restart, a replay -------------------------------------------------------------


def _train_against_a_full_disk(tmp_path: Path, spool: Path) -> tuple[Monitor, int]:
    """STEPS sampled steps to a collector process whose database stops growing after a few
    checkpoints; returns the closed monitor and what the collector's database holds."""
    db = tmp_path / "events.db"
    full = start_full_disk_collector(db, tmp_path / "collector.log")
    model, opt = small_model()
    monitor = Monitor(model, opt, collector=full.grpc_target, job=JOB, run="r1", every=1, spool=spool)
    try:
        train_steps(monitor, model, opt, STEPS)
        assert monitor.flush(timeout=60)
        closed = monitor.close(timeout=20)
    finally:
        full.stop()
    assert closed is False
    try:
        held = len(EventStore(db, create=False).history(JOB).step)
    except ValueError:  # not even the first checkpoint was committed
        held = 0
    return monitor, held


@pytest.mark.slow
@pytest.mark.parametrize("replayer", ["the next monitor", "thermoscope replay"])
def test_frames_a_full_disk_never_made_durable_survive_the_process_and_are_replayed_once(
    tmp_path: Path, replayer: str
) -> None:
    spool = tmp_path / "spool"
    monitor, held = _train_against_a_full_disk(tmp_path, spool)
    assert held < STEPS and monitor.undurable == STEPS - held  # what the full disk lost
    assert monitor.spooled + monitor.delivered == STEPS and monitor.dropped == 0
    (kept,) = Spool.leftovers(spool)  # ... and still on disk after close
    adopted = Spool.adopt(kept)
    assert len(adopted) == STEPS - held
    adopted.close(keep=True)

    db = tmp_path / "events.db"
    restarted = start_collector_process(db, None, "--history-interval", "0", "--checkpoint-interval", "0.2")
    try:
        if replayer == "the next monitor":
            model, opt = small_model()
            later = Monitor(model, opt, collector=restarted.grpc_target, job="later", every=1, spool=spool)
            train_steps(later, model, opt, 5)
            assert later.close(timeout=30)
            assert later.replayed == STEPS - held
        else:
            done = thermoscope("replay", "--spool", str(spool), "--collector", restarted.grpc_target)
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"{STEPS - held} of {STEPS - held} frames durable" in done.stdout
    finally:
        restarted.stop()
    history = EventStore(db, create=False).history(JOB)
    assert history.step.tolist() == list(range(STEPS))  # every sampled step, once, no gap
    assert os.listdir(spool) == []  # delivered: nothing left to replay


def test_replay_says_what_is_wrong_with_its_input(tmp_path: Path) -> None:
    missing = thermoscope("replay", "--spool", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    empty = thermoscope("replay", "--spool", str(tmp_path))
    assert empty.returncode == 0 and "nothing to replay" in empty.stdout
