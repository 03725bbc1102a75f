"""The job state a checkpoint writes is an explicit, versioned format: earlier databases carry on
exactly, a round trip is exact, the format names its fields, each object saves and restores its
own, fields are added without a new format, and what it cannot read is refused."""

from __future__ import annotations

import ast
import io
import json
import logging
import shutil
import sqlite3
import zipfile
from contextlib import closing
from pathlib import Path

import grpc
import numpy as np
import pytest

from thermoscope.collector.ingest.server import Telemetry
from thermoscope.collector.service import Collector
from thermoscope.collector.state import checkpoint, schema
from thermoscope.collector.state.checkpoint import values_of
from thermoscope.collector.state.store import EventStore
from thermoscope.science.derive import Thermometer
from thermoscope.science.detect import PhaseDetector
from thermoscope.wire import codec

from helpers import checkpoint_cases, golden
from helpers.golden import GOLDEN, fingerprint, state
from helpers.protocol import OpenStream, frame, hello, stream


@pytest.mark.parametrize(
    ("name", "carry_on"),
    [
        ("pickle_format", checkpoint_cases.carry_on),
        ("previous_release", checkpoint_cases.carry_on_previous_release),
    ],
)
def test_a_database_of_the_pickle_format_carries_on_as_the_release_that_wrote_it(
    tmp_path: Path, name: str, carry_on
) -> None:
    """The database resumes with the counters, phases and pending steps that release resumed,
    and the run's next frames give its readings and events (tests/golden/*.json, recorded with
    that code): bit for bit, but for their floats' rounding (within golden.RTOL, which says why)."""
    db = tmp_path / "events.db"
    shutil.copyfile(GOLDEN / f"{name}.sqlite3", db)
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    carried = carry_on(db)
    assert carried["resumed"] == expected["resumed"]
    assert len(carried["readings"]) == len(expected["readings"])
    for i, (reading, recorded) in enumerate(zip(carried["readings"], expected["readings"], strict=True)):
        golden.assert_matches(reading, golden.from_json(recorded), ("reading", i))
    golden.assert_matches(carried["events"], golden.split(expected["events"]), "events")
    assert carried["after"] == expected["after"]


def test_the_pickle_format_is_converted_once_when_the_database_opens(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    shutil.copyfile(GOLDEN / "pickle_format.sqlite3", db)
    EventStore(db).close()
    with closing(sqlite3.connect(db)) as con:
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert con.execute("PRAGMA user_version").fetchone()[0] == schema.FORMAT
        runs = con.execute("SELECT job, run FROM run_state").fetchall()
        blob = con.execute("SELECT state FROM run_state").fetchone()[0]
    assert not tables & {"job_state", "job_tables"}  # the pickles are gone: never unpickled again
    assert runs == [(checkpoint_cases.JOB, checkpoint_cases.RUN)]
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:  # arrays only: numpy refuses pickles in it
        assert all(name.endswith(".npy") for name in archive.namelist())
    np.load(io.BytesIO(blob), allow_pickle=False)


def _live_run(tmp_path: Path):
    """A run fed the golden run's frames to the middle of its shift, steps pending for rank 2."""
    store = EventStore(tmp_path / "e.db", history_interval=0)
    telemetry = Telemetry({}, store=store)
    streams = [telemetry.intake.open(checkpoint_cases.hello(rank).hello, "")[1] for rank in range(3)]
    job = telemetry.runs.held[(checkpoint_cases.JOB, checkpoint_cases.RUN)]
    for step in range(130):
        for s in streams[: 2 if step >= 120 else 3]:
            s.last_seq = step + 1
            msg = codec.encode(checkpoint_cases.sample(s.rank, step), step + 1).frame
            job.accept(s, codec.decode(msg, len(s.layers), len(s.sites), s.bins))
    return job


def test_a_round_trip_of_the_state_format_is_exact(tmp_path: Path) -> None:
    """Every value, of every kind (detector, thermometer window, readings, pending samples,
    counters, tables), comes back bit for bit, and so does everything its objects carry."""
    job = _live_run(tmp_path)
    values, tables = values_of(job, schema.STATE), values_of(job, schema.TABLES)
    assert job.pipeline.pending and values["detector"] is not None and values["transitions"]
    back = schema.decode_state(schema.encode_state(values))
    back_tables = schema.decode_tables(schema.encode_tables(tables))
    assert set(back) == set(schema.STATE) and set(back_tables) == set(schema.TABLES)
    for name in ("detector", "thermometer"):
        assert fingerprint(state(back[name])) == fingerprint(state(values[name])), name
    for name in ("reading", "pending", "last_transition_time", "frames_received", "merged_step"):
        assert fingerprint(back[name]) == fingerprint(values[name]), name
    assert list(back["transitions"].items()) == list(values["transitions"].items())
    assert back_tables == tables


#: The names the format gives what it holds (schema.py): the file format, fixed here.
STATE_NAMES = {
    "frames_duplicate", "frames_late", "frames_received", "last_transition_time", "merged_step",
    "findings.layer_names", "findings.site_names", "findings.moved", "findings.seen", "findings.base",
    "findings.base_var", "findings.previous", "findings.totals.finding", "findings.totals.count",
    *(f"findings.active.{c}" for c in (
        "finding", "scope", "layer", "step", "time", "statistic", "value", "confidence", "rank", "cleared"
    )),
    *(f"findings.{k}_{end}" for k in ("frozen", "vanish", "explode", "dead", "saturated")
      for end in ("on", "off")),
    "first.run", "first.rank", "first.step", "first.wall_time",
    "transitions.count", "transitions.from", "transitions.to",
    "detector.cooldown", "detector.cusum", "detector.down", "detector.drift", "detector.excursion",
    "detector.job", "detector.layer_baseline", "detector.layer_cooldown", "detector.layer_count",
    "detector.layer_hi", "detector.layer_initial", "detector.layer_last", "detector.layer_lo",
    "detector.layer_peak", "detector.layers", "detector.level", "detector.level_sigma",
    "detector.log_energy", "detector.peak_descent", "detector.quiet", "detector.ring",
    "detector.sigma", "detector.since_jump", "detector.steps", "detector.up", "detector.x",
    "thermometer.energy", "thermometer.entropy", "thermometer.entropy_total",
    "thermometer.hist_hi", "thermometer.hist_lo", "thermometer.histogram_entropy",
    "thermometer.layer_names", "thermometer.negentropy", "thermometer.outside", "thermometer.probe",
    "thermometer.probe_scale", "thermometer.site_functions",
    "thermometer.site_names", "thermometer.steps", "thermometer.window", "thermometer.work",
}  # fmt: skip


def test_the_format_names_its_fields_itself_not_after_private_attributes(tmp_path: Path) -> None:
    """What a database holds is named by the format: renaming an attribute of a live class
    changes schema.py's functions, never the names (nor a stored state's meaning)."""
    job = _live_run(tmp_path)
    with np.load(io.BytesIO(schema.encode_state(values_of(job, schema.STATE))), allow_pickle=False) as a:
        names = set(a.files)
    assert not any(part.startswith("_") for name in names for part in name.split("."))
    settings = {n for n in names if n.startswith("detector.settings.")}
    readings = {n for n in names if n.startswith(("reading.", "thermometer.latest.", "thermometer.last."))}
    pending = {n for n in names if n.startswith("pending.")}
    assert names - settings - readings - pending == STATE_NAMES | {"format"}
    assert {n.split(".", 1)[1] for n in pending} == {  # stacked: one member per column, not per sample
        "step", "rank", "wall_time", "energy", "layer_rows", "site_rows", "histogram_taken",
        "layers.count", "layers.mean", "layers.m2", "layers.dot_before", "layers.dot_after",
        "layers.histogram", "layers.update_sq", "sites.count", "sites.in_mean", "sites.in_m2",
        "sites.out_mean", "sites.out_m2", "sites.probe_spread",
    }  # fmt: skip


def test_the_format_reaches_into_no_object_it_stores() -> None:
    """schema.py and checkpoint.py read no private attribute of another class (by name or by
    string) and import no private name: each object saves and restores its own state."""
    for module in (schema, checkpoint):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                assert isinstance(node.value, ast.Name) and node.value.id == "self", (module, node.attr)
            elif isinstance(node, ast.ImportFrom):
                assert not [a.name for a in node.names if _private(a.name)], (module, node.module)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not _private(node.value), (module, node.value)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name[1:2].isalpha()


def test_the_thermometer_and_detector_restored_from_their_state_carry_on_exactly() -> None:
    """`from_state(to_state())` carries on as the original, to the bit; the state is a snapshot,
    unchanged by the samples the original takes after it (the detector writes into its arrays)."""
    thermometer = Thermometer(checkpoint_cases.LAYERS, checkpoint_cases.SITES)
    detector = PhaseDetector(len(checkpoint_cases.LAYERS))

    def feed(t: Thermometer, d: PhaseDetector, steps: range) -> list:
        out = []
        for step in steps:
            sample = checkpoint_cases.sample(0, step)
            reading = t.update(sample)
            out += [reading, d.update(step, reading.energy, reading.layer_entropy / sample.layers.count)]
        return out

    feed(thermometer, detector, range(100))
    saved = thermometer.to_state(), detector.to_state()
    went_on = feed(thermometer, detector, range(100, 150))
    restored = Thermometer.from_state(saved[0]), PhaseDetector.from_state(saved[1])
    assert fingerprint(feed(*restored, range(100, 150))) == fingerprint(went_on)
    assert any(went_on[1::2]), "the detector changed phase after the snapshot"
    assert fingerprint(state(restored[0])) == fingerprint(state(thermometer))
    assert fingerprint(state(restored[1])) == fingerprint(state(detector))


def _members(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


#: Fields dropped from a state as if they had been added after its writer, by object.
ADDED_LATER = {"detector": ("sigma", "layer_baseline"), "thermometer": ("probe",)}


def test_a_state_saved_before_a_field_was_added_resumes_it_with_its_default(tmp_path: Path) -> None:
    """Adding a field needs no new format nor migration: a state of the same format without it
    resumes with what a new object holds there (a reading's field: its default, else NaN), and
    every other value as saved."""
    values = values_of(_live_run(tmp_path), schema.STATE)
    members = _members(schema.encode_state(values))
    for prefix, names in [*ADDED_LATER.items(), ("reading", ("temperature_stderr",))]:
        for name in names:
            del members[f"{prefix}.{name}"]
    back = schema.decode_state(_archive(**members))
    new = {  # what a new detector and thermometer of the run's layers hold
        "detector": PhaseDetector(len(checkpoint_cases.LAYERS)).to_state(),
        "thermometer": Thermometer(checkpoint_cases.LAYERS, checkpoint_cases.SITES).to_state(),
    }
    for prefix, names in ADDED_LATER.items():
        now, saved = back[prefix].to_state(), values[prefix].to_state()
        for name in names:
            assert fingerprint(now[name]) == fingerprint(new[prefix][name]) != fingerprint(saved[name]), name
        kept = saved.keys() - set(names)
        assert fingerprint({k: now[k] for k in kept}) == fingerprint({k: saved[k] for k in kept}), prefix
    assert np.isnan(back["reading"].temperature_stderr) and not np.isnan(values["reading"].temperature_stderr)
    assert back["reading"].temperature == values["reading"].temperature
    sample = checkpoint_cases.sample(0, 200)  # and both carry on
    reading = back["thermometer"].update(sample)
    back["detector"].update(sample.step, reading.energy, reading.layer_entropy / sample.layers.count)


def test_a_field_the_reader_does_not_know_is_ignored(tmp_path: Path) -> None:
    """A later release's additions keep the format (a rollback reads them): what this release
    keeps resumes exactly, and what it does not know it never had (schema.py says why)."""
    values = values_of(_live_run(tmp_path), schema.STATE)
    blob = schema.encode_state(values)
    later = {"detector.rate": np.ones(3), "thermometer.interval": np.asarray(5), "reading.novelty": 0.5}
    back = schema.decode_state(_archive(**_members(blob), **later, interval=np.asarray(5)))
    assert set(back) == set(schema.STATE)
    expected = schema.decode_state(blob)
    for name in ("detector", "thermometer", "reading"):
        assert fingerprint(state(back[name])) == fingerprint(state(expected[name])), name
        assert fingerprint(state(back[name])) == fingerprint(state(values[name])), name


def _saved_run(tmp_path: Path) -> Path:
    db = tmp_path / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        s = OpenStream(c.grpc_target, hello("old"))
        assert [s.ack(frame(seq, seq - 1)) for seq in (1, 2, 3)] == [1, 2, 3]
        s.close()
    return db


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (lambda: _archive(format=np.asarray(schema.FORMAT + 1)), "written by a newer release"),
        (lambda: b"PK\x03\x04 not a zip at all", "not a state archive"),
        (lambda: _archive(format=np.asarray(schema.FORMAT)), "a damaged state"),
    ],
)
def test_a_state_it_cannot_read_refuses_the_runs_agents_loudly_instead_of_starting_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, blob, reason: str
) -> None:
    caplog.set_level(logging.ERROR, logger="thermoscope.collector")
    db = _saved_run(tmp_path)
    with closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE run_state SET state = ? WHERE job = 'old'", (blob(),))
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running() as c:
        replies, error = stream(c.grpc_target, [hello("old")])
        assert "old" not in c.snapshot()  # nothing of it held: its next hello tries again
        other = OpenStream(c.grpc_target, hello("other"))  # other jobs stream on
        assert other.ack(frame(1, 0)) == 1
        other.close()
    assert replies == [] and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "state_unreadable" in caplog.text or reason in error.details()
    assert reason in error.details() and str(db) in error.details()
    assert any(reason in r.message and r.levelno == logging.ERROR for r in caplog.records)
    with closing(sqlite3.connect(db)) as con:  # the state is kept as it was, for whoever repairs it
        assert con.execute("SELECT state FROM run_state WHERE job = 'old'").fetchone()[0] == blob()


def _archive(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
