"""The history is bounded (`--retention`) and gives its space back, and one job's history and
events leave the database as a JSON lines file pandas reads (`thermoscope export`).

Each test runs real collector processes on loopback against one SQLite file, fed by raw agents
whose frames are stamped in the past (a plausible wall time is kept as sent).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import pandas as pd

from helpers.processes import start_collector_process, thermoscope
from helpers.protocol import frame, hello, stream

JOB = "kept"
LAYERS = 500  # 4 KB of layer temperatures a history row
ROWS = 300
DAY = 86400.0


def fill(db: Path, *options: str, age: float = 2 * DAY) -> None:
    """A collector on `db` (with `options`) takes ROWS frames of one job, stamped `age` s ago, one
    history row each, then stops."""
    collector = start_collector_process(
        db, None, "--history-interval", "0", "--checkpoint-interval", "0.2", *options
    )
    try:
        start = time.time() - age
        messages = [hello(JOB, LAYERS)] + [frame(s + 1, s, LAYERS, wall_time=start + s) for s in range(ROWS)]
        replies, error = stream(collector.grpc_target, messages)
        assert error is None and replies[-1].ack.seq == ROWS
        time.sleep(1.0)  # a checkpoint or more after the last frame
    finally:
        collector.stop()


def history_rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute("SELECT count(*) FROM history").fetchone()[0]


def test_history_older_than_the_retention_is_deleted_and_the_file_shrinks(tmp_path: Path) -> None:
    """Kept with `--retention 0` (keep all), the rows take megabytes; the same database reopened
    with a day's retention deletes them at its first checkpoint and the file gives the space back
    (an earlier release's file is converted to incremental vacuum once, as it opens)."""
    db = tmp_path / "events.db"
    fill(db, "--retention", "0")
    kept, full = history_rows(db), db.stat().st_size
    assert kept == ROWS and full > ROWS * LAYERS * 8
    collector = start_collector_process(db, None, "--retention", str(DAY), "--checkpoint-interval", "0.2")
    time.sleep(1.5)
    collector.stop()
    after = db.stat().st_size
    assert history_rows(db) == 0
    assert after < full / 10, (full, after)


def test_rows_within_the_retention_stay(tmp_path: Path) -> None:
    """The default retention (a week) keeps a job of two days ago whole."""
    db = tmp_path / "events.db"
    fill(db)
    assert history_rows(db) == ROWS


def test_export_writes_a_job_as_json_lines_that_pandas_reads(tmp_path: Path) -> None:
    """Every history row of the job, in step order, with its layers' temperatures by name; what
    pandas reads back is what the database holds."""
    db, out = tmp_path / "events.db", tmp_path / "kept.jsonl"
    fill(db)
    result = thermoscope("export", "--db", str(db), "--job", JOB, "--out", str(out))
    assert result.returncode == 0, result.stderr
    frame_ = pd.read_json(out, lines=True)
    history = frame_[frame_.record == "history"]
    assert history.step.tolist() == list(range(ROWS))
    assert (history.job == JOB).all()
    layer_columns = [c for c in frame_.columns if c.startswith("layer_temperature.")]
    assert len(layer_columns) == LAYERS
    with contextlib.closing(sqlite3.connect(db)) as c:
        times = [t for (t,) in c.execute("SELECT time FROM history WHERE job = ? ORDER BY step", (JOB,))]
    assert history.time.tolist() == times


def test_export_refuses_an_unknown_job_or_an_existing_file_and_writes_nothing(tmp_path: Path) -> None:
    db, out = tmp_path / "events.db", tmp_path / "x.jsonl"
    fill(db)
    unknown = thermoscope("export", "--db", str(db), "--job", "nope", "--out", str(out))
    assert unknown.returncode == 2 and "no history of job 'nope'" in unknown.stderr
    assert list(tmp_path.glob("*.jsonl")) == [] and list(tmp_path.glob(".*partial")) == []
    out.write_text("mine\n")
    exists = thermoscope("export", "--db", str(db), "--job", JOB, "--out", str(out))
    assert exists.returncode == 2 and "never overwrites" in exists.stderr
    assert out.read_text() == "mine\n"
    csv = thermoscope("export", "--db", str(db), "--job", JOB, "--out", str(tmp_path / "x.csv"))
    assert csv.returncode == 2 and "JSON lines" in csv.stderr
