"""A stored state is data: what a database holds may make no object it does not check, touch no
class, and take no more memory than its bound, whatever it says.

A pickle of an earlier release (converted once, legacy.py) could set attributes on the classes
it named (`PhaseDetector.update = Counter` in the running collector: every job's frames failed)
or call them with any arguments (`PhaseDetector(10**10)`); such a database is now refused, the
classes untouched. A state archive (schema.py) is read within `MAX_STATE_BYTES` (a 3.1 MB
zip-bomb took 3.1 GB at its run's hello), and a state whose values do not fit its objects (a
shape, a setting out of bounds) refuses its run's agents with `state_unreadable` instead of a
traceback, UNKNOWN, or a collector out of memory.

Real collectors on 127.0.0.1 over real databases; agents written against the wire contract.
"""

from __future__ import annotations

import io
import logging
import resource
import shutil
import sqlite3
import zipfile
from collections import Counter
from contextlib import closing
from pathlib import Path

import grpc
import numpy as np
import pytest

from thermoscope.collector.service import Collector
from thermoscope.collector.state import schema
from thermoscope.collector.state.store import EventStore, StoreError
from thermoscope.science.detect import PhaseDetector

from helpers.golden import GOLDEN
from helpers.protocol import OpenStream, frame, hello, stream

#: Pickle opcodes (protocol 2) that set `PhaseDetector.update = Counter` on the class (BUILD with
#: a slot state), then drop what they made (POP): run before a golden state's own opcodes.
SET_CLASS_ATTRIBUTE = (
    b"cthermoscope.science.detect\nPhaseDetector\nN}X\x06\x00\x00\x00updateccollections\nCounter\ns\x86b0"
)
#: A whole state (protocol 2) whose detector is `PhaseDetector(10**10)`: the class called.
CALLED_DETECTOR = (
    b"\x80\x02}X\x08\x00\x00\x00detectorcthermoscope.science.detect\nPhaseDetector\n"
    b"(\x8a\x05\x00\xe4\x0bT\x02tRs."
)


def with_class_attribute_set(state: bytes) -> bytes:
    assert state[:1] == b"\x80"  # its protocol's number; its own opcodes follow ours
    return state[:2] + SET_CLASS_ATTRIBUTE + state[2:]


def pickled_database(tmp_path: Path, change) -> Path:
    """The golden database of the pickle format, its first job's state changed by `change`."""
    db = tmp_path / "events.db"
    shutil.copyfile(GOLDEN / "pickle_format.sqlite3", db)
    with closing(sqlite3.connect(db)) as con, con:
        job, state = con.execute("SELECT job, state FROM job_state LIMIT 1").fetchone()
        con.execute("UPDATE job_state SET state = ? WHERE job = ?", (change(state), job))
    return db


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (with_class_attribute_set, "cannot be converted"),
        (lambda _: CALLED_DETECTOR, "made with no arguments"),
    ],
    ids=["set_class_attribute", "call_with_arguments"],
)
def test_a_pickle_that_touches_or_calls_a_class_refuses_the_database_and_touches_nothing(
    tmp_path: Path, change, reason: str
) -> None:
    update, counter_update = PhaseDetector.update, Counter.update
    db = pickled_database(tmp_path, change)
    try:
        with pytest.raises(StoreError, match=reason):
            EventStore(db)
        assert PhaseDetector.update is update and Counter.update is counter_update
    finally:  # (what the code before did to this process, undone for the tests after it)
        PhaseDetector.update, Counter.update = update, counter_update
    with closing(sqlite3.connect(db)) as con:  # the database is left as it was, to be repaired
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "job_state" in tables
    # the golden database, untouched, still converts and carries on (the same classes, unharmed)
    shutil.copyfile(GOLDEN / "pickle_format.sqlite3", tmp_path / "clean.db")
    EventStore(tmp_path / "clean.db").close()


# -- state archives ----------------------------------------------------------------------------------


def saved_run(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A database with one run's state ('old', 3 frames), and that state's arrays by name."""
    db = tmp_path / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        s = OpenStream(c.grpc_target, hello("old"))
        assert [s.ack(frame(seq, seq - 1)) for seq in (1, 2, 3)] == [1, 2, 3]
        s.close()
    with closing(sqlite3.connect(db)) as con:
        (blob,) = con.execute("SELECT state FROM run_state WHERE job = 'old'").fetchone()
    with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
        return db, {name: archive[name] for name in archive.files}


def archive(arrays: dict[str, np.ndarray], bomb: int = 0) -> bytes:
    """A state archive of `arrays`, and with `bomb` > 0 one more member (a name no release
    reads) of `bomb` zero bytes, which deflate compresses ~1000 times."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    if bomb:
        with (
            zipfile.ZipFile(buffer, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as z,
            z.open("later.field.npy", "w", force_zip64=True) as member,
        ):
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|u1", "fortran_order": False, "shape": (bomb,)}
            )
            zeros = bytes(16 << 20)
            for _ in range(bomb // len(zeros)):
                member.write(zeros)
            member.write(bytes(bomb % len(zeros)))
    return buffer.getvalue()


def test_a_zip_bomb_state_is_refused_from_its_headers_without_decompressing_it(tmp_path: Path) -> None:
    _, arrays = saved_run(tmp_path)
    bomb = archive(arrays, bomb=schema.MAX_STATE_BYTES + (64 << 20))
    assert len(bomb) < 8 << 20  # a few MB on disk, over a GiB decompressed
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(schema.StateError, match="decompressed: over the bound"):
        schema.decode_state(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 << 10  # under 256 MiB more


def test_an_array_header_larger_than_its_member_is_refused(tmp_path: Path) -> None:
    _, arrays = saved_run(tmp_path)
    buffer = io.BytesIO(archive(arrays))
    with zipfile.ZipFile(buffer, "a", zipfile.ZIP_DEFLATED) as z, z.open("later.npy", "w") as member:
        np.lib.format.write_array_header_1_0(
            member, {"descr": "<f8", "fortran_order": False, "shape": (1 << 40,)}
        )
        member.write(bytes(64))
    with pytest.raises(schema.StateError, match="larger than the member"):
        schema.decode_state(buffer.getvalue())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"detector.ring": np.zeros(3)}, "ring: an array of shape (3,)"),
        ({"detector.settings.window": np.asarray(10**10)}, "settings.window: 10000000000"),
        ({"detector.layers": np.full(2, 9)}, "layers: phases 9..9"),
        ({"thermometer.entropy": np.zeros((1, 7))}, "thermometer.entropy: an array of shape (1, 7)"),
        ({"thermometer.window": np.asarray(10**12)}, "thermometer.window"),
        ({"reading.layer_temperature": np.zeros(5)}, "reading.layer_temperature"),
    ],
    ids=["ring_shape", "detector_window", "phase", "entropy_shape", "thermometer_window", "reading_shape"],
)
def test_a_state_that_does_not_fit_its_objects_refuses_its_agents_with_state_unreadable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: dict, reason: str
) -> None:
    caplog.set_level(logging.ERROR, logger="thermoscope.collector")
    db, arrays = saved_run(tmp_path)
    assert all(name in arrays for name in change)
    with closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE run_state SET state = ? WHERE job = 'old'", (archive(arrays | change),))
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        replies, error = stream(c.grpc_target, [hello("old")])
        other = OpenStream(c.grpc_target, hello("other"))  # other jobs stream on
        assert other.ack(frame(1, 0)) == 1
        other.close()
    assert replies == [] and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot be read" in error.details() and reason in error.details()


def test_a_zip_bomb_at_a_runs_hello_refuses_its_agents_and_the_collector_stays_small(tmp_path: Path) -> None:
    db, arrays = saved_run(tmp_path)
    with closing(sqlite3.connect(db)) as con, con:
        bomb = archive(arrays, bomb=schema.MAX_STATE_BYTES + (64 << 20))
        con.execute("UPDATE run_state SET state = ? WHERE job = 'old'", (bomb,))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        replies, error = stream(c.grpc_target, [hello("old")])
    assert replies == [] and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "over the bound" in error.details()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 << 10
