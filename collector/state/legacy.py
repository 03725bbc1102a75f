"""The pickle format of the job state (the releases before state format 1), read once to convert it.

Those releases pickled each job's state (`job_state`) and tables (`job_tables`), one row per
job. `migrate` converts every row of such a database into the explicit format (schema.py) in
one transaction, when the database is opened (store.py), and drops the old tables: the
unpickler runs once per database, never again. Unpickling is restricted to the classes those
pickles hold (`ALLOWED`, found where they live now through `MOVED`): a database is data, and
it must not be able to run anything else.

A row that cannot be converted refuses the whole migration (`StateError`, the database left
as it was): its job would otherwise start afresh and lose the no-loss guarantee.
"""

from __future__ import annotations

import io
import pickle
import sqlite3
from collections import Counter
from typing import Any

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
}
#: The pickles' names -> the format's (the same values).
RENAMED = {
    "_pending": "pending",
    "_merged_step": "merged_step",
    "_thermometer": "thermometer",
    "_tables": "by_rank",
}


class _Unpickler(pickle.Unpickler):
    """Finds each allowed class where it lives now (`MOVED`); refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        module = MOVED.get(module, module)
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"a job state may not name {module}.{name}")
        return super().find_class(module, name)


def loads(data: bytes) -> dict[str, Any]:
    """The values of a pickled state or tables, by the format's names."""
    values = _Unpickler(io.BytesIO(data)).load()
    if not isinstance(values, dict):
        raise pickle.UnpicklingError(f"a job state is a dict, not {type(values).__name__}")
    return {RENAMED.get(name, name): value for name, value in values.items()}


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
        except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, KeyError, TypeError) as exc:
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
