"""The seeded run behind tests/golden/pickle_format.sqlite3, and how a collector carries it on.

`record_database` runs a real `thermoscope collector --db` process with three raw-protocol ranks
of one job: a few hundred frames whose energy falls, jumps (a data shift) and falls again, so
the job changes phase and writes events; at the end ranks 0 and 1 are ahead of rank 2, whose
stream stays open, so steps wait unmerged. Once a checkpoint holds the last frame the process
is killed (-9): the database is left as that release's checkpoint wrote it.

`carry_on` resumes such a database in a collector of the code under test and feeds every rank
the same next frames; what it returns (counters, phases, every reading, the events) is what
tests/golden/pickle_format.json recorded with the code that wrote the database. Every frame is
stamped with a fixed wall time, so the readings are reproducible (to the bit on one OpenBLAS
kernel; helpers/golden.py says why not across kernels).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import numpy as np

from thermoscope.collector.service import Collector
from thermoscope.collector.state.store import EventStore
from thermoscope.science.derive import Reading
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec

from .processes import start_collector_process
from .protocol import OpenStream

JOB, RUN, RANKS, BINS = "golden", "pickle-run", 3, 8
LAYERS = [LayerInfo(f"layer{i}", (50 * (i + 1),), 50 * (i + 1), "float32") for i in range(3)]
SITES = [SiteInfo("site0", "ReLU"), SiteInfo("site1", "Tanh")]
#: Steps every rank sends before the kill; ranks 0 and 1 send AHEAD steps more (rank 2 does not).
STEPS, AHEAD, SHIFT_AT = 180, 5, 110
#: Steps each rank sends when the run carries on.
MORE = 10
EPOCH = 1_700_000_000.0  # the wall time of step 0 (in the past of any clock that runs this)


def hello(rank: int, run: str = RUN) -> pb.AgentMessage:
    return codec.hello(
        job_id=JOB,
        run_id=run,
        rank=rank,
        world_size=RANKS,
        host=f"host{rank}",
        agent_version="test",
        every=1,
        layers=LAYERS,
        sites=SITES,
        bins=BINS,
    )


def sample(rank: int, step: int) -> Sample:
    """Rank `rank`'s statistics at `step`: seeded, its energy falling, then jumping at SHIFT_AT."""
    rng = np.random.default_rng([rank, step])
    since = step - SHIFT_AT if step >= SHIFT_AT else step
    level = (4.0 if step >= SHIFT_AT else 1.0) * (2.0 * np.exp(-since / 25) + 0.05)
    energy = float(level * np.exp(0.03 * rng.standard_normal()))
    count = np.array([layer.numel for layer in LAYERS], dtype=np.int64)
    spread = 1.0 + 0.5 * np.exp(-since / 30) * np.array([1.0, 2.0, 0.5]) + 0.01 * rng.random(3)
    m2 = count * spread**2
    dots = 1e-3 * count * rng.random((2, 3))
    hist = rng.integers(0, 20, size=(len(LAYERS), BINS + 2), dtype=np.int64)
    probe = np.array([0.4, -1.0]) if step % 20 == 0 else np.full(2, -1.0)
    n = np.full(len(SITES), 64, dtype=np.int64)
    return Sample(
        step=step,
        wall_time=EPOCH + step,
        energy=energy,
        layers=LayerStats(count, 0.01 * rng.standard_normal(3), m2, dots[0], dots[1], hist),
        sites=SiteStats(n, rng.random(2), 64 + rng.random(2), rng.random(2), 32 + rng.random(2), probe),
    )


def steps_before_kill(rank: int) -> list[int]:
    return list(range(STEPS + (AHEAD if rank < 2 else 0)))


def record_database(db: Path) -> None:
    """Write the golden database with the code of today (see the module docstring)."""
    proc = start_collector_process(db, None, "--checkpoint-interval", "0.2", "--history-interval", "0")
    try:
        streams = {rank: OpenStream(proc.grpc_target, hello(rank)) for rank in range(RANKS)}
        for step in range(STEPS + AHEAD):
            for rank, s in streams.items():
                if step in steps_before_kill(rank):
                    assert s.ack(codec.encode(sample(rank, step), step + 1)) == step + 1
        want = {rank: len(steps_before_kill(rank)) for rank in range(RANKS)}
        deadline = time.monotonic() + 30
        while _durable_marks(db) != want:
            assert time.monotonic() < deadline, "no checkpoint held the last frames"
            time.sleep(0.1)
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(timeout=10)
    finally:
        proc.stop()
    with closing(sqlite3.connect(db)) as con:  # one file: the WAL folded in, as a copy needs it
        con.execute("PRAGMA journal_mode=DELETE").fetchall()


def _durable_marks(db: Path) -> dict[int, int]:
    with closing(sqlite3.connect(db)) as con:
        try:
            return dict(con.execute("SELECT rank, seq FROM marks WHERE job = ?", (JOB,)).fetchall())
        except sqlite3.OperationalError:  # no table yet
            return {}


def carry_on(db: Path) -> dict:
    """Resume `db` in a collector of the code under test, give each rank MORE steps (rank 2 first
    catches up on the steps waiting for it), and report what the collector made of it."""
    frames = {}
    for rank in (2, 0, 1):
        done = len(steps_before_kill(rank))
        steps = range(done, STEPS + AHEAD + MORE)
        frames[rank] = [codec.encode(sample(rank, step), seq) for seq, step in enumerate(steps, done + 1)]
    return _carry_on(db, JOB, {rank: hello(rank) for rank in range(RANKS)}, frames)


#: The job of tests/golden/previous_release.sqlite3 (tests/test_resume_previous_release.py).
PREVIOUS_JOB, PREVIOUS_RUN, PREVIOUS_BINS = "demo", "67a111b962c6", 512
PREVIOUS_LAYERS = [
    LayerInfo(name, shape, int(np.prod(shape)), "float32", hist_lo=lo, hist_hi=hi)
    for name, shape, lo, hi in [
        ("0.weight", (128, 32), -0.875, 0.8125),
        ("0.bias", (128,), -0.8125, 0.8125),
        ("2.weight", (128, 128), -0.4375, 0.4375),
        ("2.bias", (128,), -0.4375, 0.4375),
        ("4.weight", (1, 128), -0.4375, 0.4375),
        ("4.bias", (1,), -0.04296875, 0.05859375),
    ]
]
PREVIOUS_SITES = [SiteInfo("1", "ReLU"), SiteInfo("3", "Tanh")]
PREVIOUS_LAST_SEQ, PREVIOUS_LAST_STEP = 120, 595


def previous_hello() -> pb.AgentMessage:
    """The hello of the demo's agent in tests/golden/previous_release.sqlite3 (its run, so the
    job's saved state is its own)."""
    return codec.hello(
        job_id=PREVIOUS_JOB,
        run_id=PREVIOUS_RUN,
        rank=0,
        world_size=1,
        host="test",
        agent_version="test",
        every=5,
        layers=PREVIOUS_LAYERS,
        sites=PREVIOUS_SITES,
        bins=PREVIOUS_BINS,
    )


def carry_on_previous_release(db: Path) -> dict:
    """`carry_on` for tests/golden/previous_release.sqlite3: its demo's agent sends MORE frames."""
    count = np.array([layer.numel for layer in PREVIOUS_LAYERS], dtype=np.int64)
    frames = []
    for i in range(1, MORE + 1):
        rng = np.random.default_rng(i)
        step = PREVIOUS_LAST_STEP + 5 * i
        hist = rng.integers(0, 50, size=(len(PREVIOUS_LAYERS), PREVIOUS_BINS + 2), dtype=np.int64)
        n = np.full(2, 64, dtype=np.int64)
        s = Sample(
            step=step,
            wall_time=EPOCH + step,
            energy=0.025 * (1 + 0.05 * rng.standard_normal()),
            layers=LayerStats(
                count,
                0.01 * rng.random(6),
                0.01 * count * (1 + rng.random(6)),
                1e-4 * count,
                2e-4 * count,
                hist,
            ),
            sites=SiteStats(
                n, rng.random(2), 64 + rng.random(2), rng.random(2), 32 + rng.random(2), -np.ones(2)
            ),
        )
        frames.append(codec.encode(s, PREVIOUS_LAST_SEQ + i))
    return _carry_on(db, PREVIOUS_JOB, {0: previous_hello()}, {0: frames})


def _carry_on(db: Path, job: str, hellos: dict[int, pb.AgentMessage], frames: dict[int, list]) -> dict:
    """Open every rank's stream, then send each rank's frames (in the order of `frames`)."""
    readings: list[Reading] = []  # immutable: a reading's deferred values never change
    collector = Collector(
        "127.0.0.1:0",
        "127.0.0.1:0",
        db=db,
        history_interval=0,
        checkpoint_interval=600,
        on_reading=lambda _, reading: readings.append(reading),
    )
    with collector.running() as c:
        streams = {rank: OpenStream(c.grpc_target, h) for rank, h in hellos.items()}
        resumed = _view(c, job)
        for rank, messages in frames.items():
            for message in messages:
                assert streams[rank].ack(message) == message.frame.seq
        for s in streams.values():
            s.close()
        after = _view(c, job)
    store = EventStore(db, create=False)
    events = [e.as_dict() for e in store.query(job=job)]
    store.close()
    return {"resumed": resumed, "after": after, "readings": readings, "events": events}


def _view(c: Collector, job_id: str) -> dict:
    job = c.snapshot()[job_id]
    phases = c.jobs[job_id].phases()
    return {
        "last_step": job["last_step"],
        "frames_received": job["frames_received"],
        "frames_late": job["frames_late"],
        "phase": None if phases is None else phases.job,
        "layer_phases": None if phases is None else phases.layers,
        "transitions": None if phases is None else sorted([*k, v] for k, v in phases.transitions.items()),
        "last_transition_time": None if phases is None else phases.last_transition_time,
    }
