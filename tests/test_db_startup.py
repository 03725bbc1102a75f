"""A collector starts only on a database it can trust, and carries on what it was told before:
an empty, corrupt or newer file stops it with one line naming the file; detached jobs stay paused."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from thermoscope.collector.service import Collector
from thermoscope.collector.state import schema

from helpers.processes import free_port, start_collector_process, thermoscope
from helpers.protocol import OpenStream, frame, hello


def _collector_on(db: Path):
    return thermoscope(
        "collector",
        "--grpc",
        f"127.0.0.1:{free_port()}",
        "--metrics",
        f"127.0.0.1:{free_port()}",
        "--db",
        str(db),
        timeout=60,
    )


def _newer(db: Path) -> None:
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running():
        pass
    with closing(sqlite3.connect(db)) as con:
        con.execute(f"PRAGMA user_version = {schema.FORMAT + 1}")


def _corrupt(db: Path) -> None:
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        s = OpenStream(c.grpc_target, hello("j"))
        assert [s.ack(frame(seq, seq - 1)) for seq in range(1, 40)] == list(range(1, 40))
        s.close()
    data = bytearray(db.read_bytes())
    data[4096 : 3 * 4096] = b"\xa5" * 2 * 4096  # pages 2 and 3 (tables' roots): no b-tree sqlite can walk
    db.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda db: db.write_bytes(b""), "an empty file (0 bytes)"),
        (lambda db: db.write_bytes(b"these are not the pages of a database" * 200), "not a usable"),
        (_corrupt, "malformed"),
        (_newer, "written by a newer release"),
    ],
)
def test_a_database_it_must_not_run_on_stops_the_collector_with_one_line_naming_the_file(
    tmp_path: Path, spoil, reason: str
) -> None:
    db = tmp_path / "events.db"
    spoil(db)
    before = db.read_bytes()
    done = _collector_on(db)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"thermoscope collector: {db}: ") and reason in lines[0], lines[0]
    assert db.read_bytes() == before  # left as it was, for whoever looks into it


def test_a_new_database_and_one_of_this_format_start(tmp_path: Path) -> None:
    db = tmp_path / "new" / "events.db"
    for _ in range(2):  # created, then reopened
        process = start_collector_process(db)
        process.stop()
        assert process.proc.returncode == 0
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == schema.FORMAT


def test_a_detached_job_stays_paused_for_a_restarted_collector(tmp_path: Path) -> None:
    """`detach` (what `thermoscope detach` asks the collector actor) is kept in the database: a
    collector restarted on it tells the job's agents they are paused; `attach` undoes it."""
    db = tmp_path / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        c.detach("quiet")
        c.detach(None)
        c.attach("loud")
    process = start_collector_process(db)
    try:
        paused = {
            job: OpenStream(process.grpc_target, hello(job)).config.paused
            for job in ("quiet", "other", "loud")
        }
    finally:
        process.stop()
    assert paused == {"quiet": True, "other": True, "loud": False}
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        c.attach(None)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        assert not OpenStream(c.grpc_target, hello("quiet")).config.paused
