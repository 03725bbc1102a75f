"""A collector of this release carries on the jobs of a database that the previous release wrote.

tests/golden/previous_release.sqlite3 is such a database, as it was left: the release before the
re-layout (commit de0f99f, whose checkpoints pickle `thermoscope.agent.derive.Reading`,
`thermoscope.agent.stats.Sample`, ...) ran `thermoscope demo --steps 600 --every 5 --db FILE`, a
training of 600 steps streaming every 5th over gRPC to its collector, which checkpointed the job
"demo" as it stopped. The numbers below are what that release's own `Job` read back from it.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from thermoscope.collector.service import Collector
from thermoscope.collector.state.store import EventStore
from thermoscope.science.stats import LayerStats, Sample, SiteStats
from thermoscope.wire import codec

from helpers.checkpoint_cases import PREVIOUS_BINS as BINS
from helpers.checkpoint_cases import PREVIOUS_JOB as JOB
from helpers.checkpoint_cases import PREVIOUS_LAYERS as LAYERS
from helpers.checkpoint_cases import PREVIOUS_SITES as SITES
from helpers.checkpoint_cases import previous_hello
from helpers.golden import GOLDEN
from helpers.metrics import scrape, value
from helpers.protocol import OpenStream

#: The job as the previous release recorded it.
LAST_STEP, FRAMES, LAST_SEQ = 595, 120, 120
PHASE = "type_ii"
LAYER_PHASES = ["refresh", "type_ii", "type_ii", "type_ii", "type_ii", "type_ii"]
TRANSITIONS = {
    ("type_i", "transition"): 1,
    ("transition", "type_ii"): 2,
    ("type_ii", "refresh"): 1,
    ("refresh", "transition"): 1,
}
LAST_TRANSITION_TIME = 1796210882.248259
EVENTS = 23


def next_frame(seq: int, step: int):
    """A frame of the demo's layers and sites, with plausible statistics."""
    count = np.array([layer.numel for layer in LAYERS], dtype=np.int64)
    hist = np.zeros((len(LAYERS), BINS + 2), dtype=np.int64)
    hist[:, 1 : BINS + 1] = (count // BINS + 1)[:, None]
    ones = np.ones(len(SITES))
    sample = Sample(
        step=step,
        wall_time=time.time(),
        energy=0.025,
        layers=LayerStats(count, 0.01 * np.ones(len(LAYERS)), 0.01 * count, 1e-4 * count, 1e-4 * count, hist),
        sites=SiteStats(
            np.full(len(SITES), 64, dtype=np.int64),
            ones,
            64 * ones,
            ones,
            32 * ones,
            np.full(len(SITES), -1.0),
        ),
    )
    return codec.encode(sample, seq)


@pytest.fixture
def previous_db(tmp_path: Path) -> Path:
    """A copy of the golden database (the collector writes into it)."""
    db = tmp_path / "events.db"
    shutil.copyfile(GOLDEN / "previous_release.sqlite3", db)
    return db


def test_a_job_of_the_previous_release_resumes_at_its_step_phases_and_counters(
    previous_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="thermoscope.collector")
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=previous_db).running() as c:
        agent = OpenStream(c.grpc_target, previous_hello())
        job = c.snapshot()[JOB]
        metrics = scrape(c.metrics_url)
        phases = c.jobs[JOB].phases()
        agent.close()
    assert f"job {JOB}: resumed after step {LAST_STEP}" in caplog.text
    assert (job["last_step"], job["frames_received"], job["frames_late"]) == (LAST_STEP, FRAMES, 0)
    assert value(metrics, "thermoscope_last_step", job_id=JOB) == LAST_STEP
    assert value(metrics, "thermoscope_frames_duplicate_total", job_id=JOB) == 0
    assert value(metrics, "thermoscope_phase", job_id=JOB, scope="job", layer="", phase=PHASE) == 1
    assert (phases.job, phases.layers) == (PHASE, LAYER_PHASES)
    assert phases.transitions == TRANSITIONS
    assert value(metrics, "thermoscope_last_transition_timestamp_seconds", job_id=JOB) == LAST_TRANSITION_TIME
    store = EventStore(previous_db, create=False)
    assert len(store.query(job=JOB)) == EVENTS  # its events stay, none added twice
    store.close()


def test_the_resumed_job_knows_the_frames_it_holds_and_goes_on_from_them(previous_db: Path) -> None:
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=previous_db).running() as c:
        agent = OpenStream(c.grpc_target, previous_hello())
        agent.send(next_frame(LAST_SEQ, LAST_STEP))  # a replay of the last frame the old checkpoint holds
        ack = agent.reply().ack
        assert (ack.seq, ack.durable) == (LAST_SEQ, LAST_SEQ)
        assert agent.ack(next_frame(LAST_SEQ + 1, LAST_STEP + 5)) == LAST_SEQ + 1
        job = c.snapshot()[JOB]
        metrics = scrape(c.metrics_url)
        agent.close()
    assert (job["last_step"], job["frames_received"]) == (LAST_STEP + 5, FRAMES + 1)
    assert value(metrics, "thermoscope_frames_duplicate_total", job_id=JOB) == 1
    # its state, checkpointed by this release as the collector stopped, resumes in turn
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=previous_db).running() as c:
        agent = OpenStream(c.grpc_target, previous_hello())
        job = c.snapshot()[JOB]
        agent.close()
    assert (job["last_step"], job["frames_received"]) == (LAST_STEP + 5, FRAMES + 1)
