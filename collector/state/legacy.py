"""The pickle format of the job state (the releases before state format 1), read once to convert it.

Those releases pickled each job's state (`job_state`) and tables (`job_tables`), one row per
job. `migrate` converts every row of such a database into the explicit format (schema.py) in
one transaction, when the database is opened (store.py), and drops the old tables: the
unpickler runs once per database, never again. Unpickling is restricted to the classes those
pickles hold (`ALLOWED`, found where they live now through `MOVED`): a database is data, and
it must not be able to run anything else. Nor may it touch those classes: the unpickler makes
no object of the collector's (or `Counter`) itself, but a `_Record` of what the pickle says
(the arguments, the attributes), and `_build` makes each object from those values checked, by
its constructor or its `from_state`. Before, a pickle could set attributes on the allowed
classes themselves (`PhaseDetector.update = Counter` in the running collector failed every
job's frames), or call them with any arguments (`PhaseDetector(10**10)`).

A row that cannot be converted refuses the whole migration (`StateError`, the database left
as it was): its job would otherwise start afresh and lose the no-loss guarantee.
"""

from __future__ import annotations

import io
import math
import pickle
import sqlite3
from collections import Counter, deque
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np

from thermoscope.science.derive import Reading, Thermometer
from thermoscope.science.detect import PhaseDetector

from . import schema
from .schema import StateError

#: Modules whose pickled classes moved, as databases of earlier releases name them -> now.
MOVED = {
    "thermoscope.agent.derive": "thermoscope.science.derive",
    "thermoscope.agent.physics": "thermoscope.science.physics",
    "thermoscope.agent.stats": "thermoscope.science.stats",
    "thermoscope.collector.detect": "thermoscope.science.detect",
}
_NUMPY = ("scalar", "_reconstruct")
_STATS = ("LayerInfo", "LayerStats", "Sample", "SiteInfo", "SiteStats")
#: Every global those pickles may name (after `MOVED`).
ALLOWED = {
    ("collections", "Counter"),
    ("collections", "deque"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in _NUMPY),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("thermoscope.science.derive", "Reading"),
    ("thermoscope.science.derive", "Thermometer"),
    *(("thermoscope.science.stats", name) for name in _STATS),
    ("thermoscope.science.detect", "PhaseDetector"),
    ("thermoscope.science.detect", "Settings"),
}
#: What a fresh job holds, for the names a pickle of an older release lacks (it resumed them so).
ABSENT = {
    "reading": None,
    "detector": None,
    "transitions": Counter(),
    "last_transition_time": None,
    "frames_received": 0,
    "frames_late": 0,
    "frames_duplicate": 0,
    "pending": {},
    "merged_step": -1,
    "thermometer": None,
    "first": {},  # (not kept by the pickles: their agents' replays start past their frame 1)
    "findings": None,
}
#: The pickles' names -> the format's (the same values).
RENAMED = {
    "_pending": "pending",
    "_merged_step": "merged_step",
    "_thermometer": "thermometer",
    "_tables": "by_rank",
}


class _Record:
    """An object a pickle names, as data: the arguments it was made with and the state it was
    given (`kind`, its class, is set on a subclass made for each load: what the pickle does to
    the class it holds touches that subclass alone)."""

    kind: type

    def __new__(cls, *args: Any) -> _Record:
        record = super().__new__(cls)
        record.args, record.state = args, None
        return record

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's `_reconstruct` as an array's pickle calls it: an empty array, given its values by
    its state next (numpy checks that their bytes fit its shape); any other call is refused."""
    if subtype is not np.ndarray or math.prod(shape) > 1:
        raise pickle.UnpicklingError("an array's pickle makes an empty array first")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


class _Unpickler(pickle.Unpickler):
    """Finds each allowed class where it lives now (`MOVED`); refuses every other global. The
    collector's classes and `Counter` are `_Record`s; numpy's are numpy's (made in C: a pickle
    cannot set their attributes), `_reconstruct` checked."""

    def find_class(self, module: str, name: str) -> Any:
        module = MOVED.get(module, module)
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"a job state may not name {module}.{name}")
        found = super().find_class(module, name)
        if name == "_reconstruct":
            return _reconstruct
        if module.startswith("thermoscope.") or found is Counter:
            return type(name, (_Record,), {"kind": found})
        return found


def loads(data: bytes) -> dict[str, Any]:
    """The values of a pickled state or tables, by the format's names, each object made from
    its checked values (`_build`)."""
    values = _build(_Unpickler(io.BytesIO(data)).load())
    if not isinstance(values, dict):
        raise pickle.UnpicklingError(f"a job state is a dict, not {type(values).__name__}")
    return {RENAMED.get(name, name): value for name, value in values.items()}


def _build(value: Any) -> Any:
    """`value` with each `_Record` in it made into its object, from checked values."""
    if isinstance(value, _Record):
        return _made(value)
    if isinstance(value, dict):
        return {_build(k): _build(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_build(v) for v in value)
    if isinstance(value, deque):
        return deque((_build(v) for v in value), maxlen=value.maxlen)
    return value


def _made(record: _Record) -> Any:
    """The object a record stands for: a `Counter` of its one argument; a reading, thermometer
    or detector through its `from_state` (which checks every value); another dataclass
    through its constructor (which takes its fields and no other name)."""
    kind = record.kind
    if kind is Counter:
        if record.state is not None or len(record.args) > 1:
            raise pickle.UnpicklingError("a Counter is made of one mapping")
        return Counter(*(_build(a) for a in record.args))
    if record.args:
        raise pickle.UnpicklingError(f"a pickled {kind.__name__} is made with no arguments")
    attributes = _attributes(kind, record.state)
    if kind is Reading:
        return Reading.from_state(attributes)
    if kind in (Thermometer, PhaseDetector):
        bare = kind.__new__(kind)  # its attributes as the release that pickled it named them ...
        if kind is Thermometer:
            bare.__setstate__(attributes)
        else:
            bare.__dict__.update(attributes)
        return kind.from_state(bare.to_state())  # ... read as the format names them, and checked
    if not is_dataclass(kind):
        raise pickle.UnpicklingError(f"no way to make a {kind.__name__} of a pickle")
    return kind(**{f.name: attributes[f.name] for f in fields(kind) if f.name in attributes})


def _attributes(kind: type, state: Any) -> dict[str, Any]:
    """A record's state: attribute names to values (built), none of them the class's own (a
    method, a property) but a dataclass's fields (their defaults) and the one older
    thermometers saved (`_shape`)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise pickle.UnpicklingError(f"a pickled {kind.__name__} holds attributes by name")
    allowed = {"_shape", *(f.name for f in fields(kind))} if is_dataclass(kind) else {"_shape"}
    own = [k for k in state if hasattr(kind, k) and k not in allowed]
    if own:
        raise pickle.UnpicklingError(f"a pickled {kind.__name__} may not replace its class's {own}")
    return {k: _build(v) for k, v in state.items()}


def migrate(db: sqlite3.Connection) -> int:
    """Convert the pickled states of `db` into `run_state` rows of the explicit format, in the
    caller's open transaction, and drop the old tables: the number of jobs converted. A job's
    state goes to every run its marks name (the pickle format resumed it for any of them)."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "job_state" not in tables:
        return 0
    pickled = dict(db.execute("SELECT job, tables FROM job_tables")) if "job_tables" in tables else {}
    jobs = 0
    for job, state in db.execute("SELECT job, state FROM job_state").fetchall():
        if job not in pickled:  # a state without tables never resumed: nothing to carry on
            continue
        try:
            values = loads(state)
            encoded = schema.encode_state({name: values.get(name, ABSENT[name]) for name in schema.STATE})
            tables_values = loads(pickled[job])
            encoded_tables = schema.encode_tables({name: tables_values[name] for name in schema.TABLES})
            schema.decode_state(encoded), schema.decode_tables(encoded_tables)  # read back, as a resume will
        except (
            pickle.UnpicklingError, AttributeError, ImportError, EOFError, KeyError, TypeError, ValueError,
            IndexError, StateError,
        ) as exc:  # fmt: skip
            raise StateError(f"job {job!r}: its pickled state cannot be converted ({exc})") from None
        runs = [run for (run,) in db.execute("SELECT DISTINCT run FROM marks WHERE job = ?", (job,))] or [""]
        db.executemany(
            "INSERT OR REPLACE INTO run_state (job, run, state, tables) VALUES (?, ?, ?, ?)",
            [(job, run, encoded, encoded_tables) for run in runs],
        )
        jobs += 1
    db.execute("DROP TABLE job_state")
    db.execute("DROP TABLE IF EXISTS job_tables")
    return jobs
