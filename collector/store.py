"""Durable phase-transition events, and each job's history: an embedded SQLite database in WAL mode.

WAL lets `thermoscope events` and `thermoscope plot` read while the collector writes, and
survives a crash of the writer with every committed row intact. The collector writes at its
checkpoints only (every `--checkpoint-interval` seconds, `checkpoint.Checkpointer`): each
job that changed writes its new history rows and events with its state, and one `commit`
makes them all durable, so what is committed is always consistent with the states saved.
The history keeps what `thermoscope plot` draws — energy, entropy, temperature and every
layer's temperature (one float64 blob, in the order of the job's layer names) — at most one
row per job every `history_interval` seconds, so its size follows wall time, not step rate.

It also keeps what a collector killed and restarted on the same database needs in order to
lose no frame and count none twice (`save_job` / `load_job`): per (job, run, rank) the
sequence number and step of the last frame applied (`marks`), and per job the state its merge and phase
detector resume from (`job_state`, a pickle that checkpoint.py writes and reads). The marks, the
states, and the history rows and events the same frames produced commit together, so a
restarted collector resumes from a state whose events are exactly those in the database.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from thermoscope.science.derive import Reading

from .settings import DEFAULTS

#: The columns of an event, in the contract's names (`thermoscope events --json`).
FIELDS = ("job", "scope", "layer", "step", "time", "from", "to", "statistic", "confidence")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('job', 'layer')),
    layer TEXT NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    from_phase TEXT NOT NULL,
    to_phase TEXT NOT NULL,
    statistic TEXT NOT NULL,
    confidence REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job_time ON events (job, time);
CREATE TABLE IF NOT EXISTS history (
    job TEXT NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    energy REAL,  -- NULL: NaN, undefined
    entropy REAL,
    temperature REAL,
    energy_from_work INTEGER NOT NULL,
    layer_temperature BLOB NOT NULL,
    PRIMARY KEY (job, step)
);
CREATE TABLE IF NOT EXISTS layer_names (job TEXT PRIMARY KEY, names TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS marks (
    job TEXT NOT NULL,
    run TEXT NOT NULL,
    rank INTEGER NOT NULL,
    seq INTEGER NOT NULL,  -- the sequence number and step of the last frame applied (and acknowledged)
    step INTEGER NOT NULL,
    PRIMARY KEY (job, run, rank)
);
CREATE TABLE IF NOT EXISTS job_state (job TEXT PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS job_tables (job TEXT PRIMARY KEY, tables BLOB NOT NULL);
"""


@dataclass(frozen=True)
class History:
    """A job's readings over its run, as `thermoscope plot` draws them (NaN: undefined)."""

    job: str
    step: np.ndarray
    time: np.ndarray
    energy: np.ndarray
    entropy: np.ndarray
    temperature: np.ndarray
    energy_from_work: bool
    layer_names: tuple[str, ...]
    layer_temperature: np.ndarray  # (steps, layers); layers added later are NaN before


@dataclass(frozen=True)
class Event:
    """One change of phase of a job (scope "job", layer "") or of one of its layers."""

    job: str
    scope: str
    layer: str
    step: int
    time: float  # seconds since the Unix epoch, of the sample that revealed it
    from_: str
    to: str
    statistic: str  # what the detector saw: e.g. "cusum_energy_jump", "energy_slope_t"
    confidence: float  # in (0.5, 1): how far the statistic went past its threshold

    def as_dict(self) -> dict[str, object]:
        """The event with the field names of the contract (`from`, not `from_`)."""
        d = asdict(self)
        d["from"] = d.pop("from_")
        return {k: d[k] for k in FIELDS}


class EventStore:
    """Append and query events; one connection, used from one thread at a time."""

    def __init__(
        self, path: str | Path, *, create: bool = True, history_interval: float = DEFAULTS.history_interval
    ) -> None:
        path = Path(path)
        self.history_interval = history_interval
        self._last_history: dict[str, float] = {}  # job -> time of its last history row
        self._names: dict[str, tuple[str, ...]] = {}
        if not create and not path.exists():
            raise FileNotFoundError(f"no event database at {path}")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint
        self._db.executescript(_SCHEMA)

    def commit(self) -> None:
        """Make everything written since the last commit durable, at once."""
        self._db.commit()

    def rollback(self) -> None:
        """Forget everything written since the last commit."""
        self._db.rollback()
        self._names.clear()  # the layer names written meanwhile are gone too: write them again

    def save_job(
        self, job: str, marks: dict[tuple[str, int], tuple[int, int]], state: bytes, tables: bytes | None
    ) -> None:
        """Record the (run, rank) -> (seq, step) marks, the job's resumable state and, when they
        changed (None: they did not), its layer and site tables: kept apart because they change
        only when an agent says hello and cost more to pickle than the rest."""
        self._db.executemany(
            "INSERT OR REPLACE INTO marks (job, run, rank, seq, step) VALUES (?, ?, ?, ?, ?)",
            [(job, run, rank, seq, step) for (run, rank), (seq, step) in marks.items()],
        )
        self._db.execute("INSERT OR REPLACE INTO job_state (job, state) VALUES (?, ?)", (job, state))
        if tables is not None:
            self._db.execute("INSERT OR REPLACE INTO job_tables (job, tables) VALUES (?, ?)", (job, tables))

    def load_job(self, job: str) -> tuple[dict[tuple[str, int], tuple[int, int]], bytes | None, bytes | None]:
        """The job's marks, state and tables as `save_job` left them (empty, None, None: never saved)."""
        rows = self._db.execute("SELECT run, rank, seq, step FROM marks WHERE job = ?", (job,))
        marks = {(run, rank): (seq, step) for run, rank, seq, step in rows}
        state = self._db.execute("SELECT state FROM job_state WHERE job = ?", (job,)).fetchone()
        tables = self._db.execute("SELECT tables FROM job_tables WHERE job = ?", (job,)).fetchone()
        return marks, None if state is None else state[0], None if tables is None else tables[0]

    def add(self, events: list[Event]) -> None:
        if not events:
            return
        self._db.executemany(
            "INSERT INTO events (job, scope, layer, step, time, from_phase, to_phase, statistic,"
            " confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [tuple(e.as_dict().values()) for e in events],
        )

    def due(self, job: str, reading: Reading) -> bool:
        """Whether the reading goes into the job's history: none was kept less than an interval
        before it (a reading found due is counted as kept)."""
        last = self._last_history.get(job, -math.inf)
        if reading.wall_time - last < self.history_interval:
            return False
        self._last_history[job] = reading.wall_time
        return True

    def add_reading(self, job: str, reading: Reading) -> None:
        """Keep the reading in the job's history (`due` decides which)."""
        names_changed = self._names.get(job) != reading.layer_names
        if names_changed:
            self._db.execute(
                "INSERT OR REPLACE INTO layer_names (job, names) VALUES (?, ?)",
                (job, json.dumps(reading.layer_names)),
            )
        self._db.execute(
            "INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job,
                reading.step,
                reading.wall_time,
                reading.energy,
                reading.entropy,
                reading.temperature,
                reading.energy_from_work,
                np.asarray(reading.layer_temperature, dtype="<f8").tobytes(),
            ),
        )
        self._names[job] = reading.layer_names

    def history(self, job: str) -> History:
        """The job's history in step order (ValueError if it has none)."""
        rows = self._db.execute(
            "SELECT step, time, energy, entropy, temperature, energy_from_work, layer_temperature"
            " FROM history WHERE job = ? ORDER BY step",
            (job,),
        ).fetchall()
        names = self._db.execute("SELECT names FROM layer_names WHERE job = ?", (job,)).fetchone()
        if not rows or names is None:
            raise ValueError(f"no history of job {job!r} in {self.path}")
        layer_names = tuple(json.loads(names[0]))
        layer_t = np.full((len(rows), len(layer_names)), np.nan)
        for i, row in enumerate(rows):
            values = np.frombuffer(row[6], dtype="<f8")[: len(layer_names)]
            layer_t[i, : len(values)] = values
        # SQLite keeps NaN as NULL, which numpy reads back as NaN
        time, energy, entropy, temperature = (
            np.array([row[k] for row in rows], dtype=float) for k in range(1, 5)
        )
        return History(
            job=job,
            step=np.array([r[0] for r in rows], dtype=np.int64),
            time=time,
            energy=energy,
            entropy=entropy,
            temperature=temperature,
            energy_from_work=bool(rows[-1][5]),
            layer_names=layer_names,
            layer_temperature=layer_t,
        )

    def latest_job(self) -> str | None:
        """The job with the newest history row."""
        row = self._db.execute("SELECT job FROM history ORDER BY time DESC LIMIT 1").fetchone()
        return None if row is None else row[0]

    def query(self, job: str | None = None, since: float | None = None) -> list[Event]:
        """Events in time order, optionally of one job and at or after `since` (epoch seconds)."""
        sql = "SELECT job, scope, layer, step, time, from_phase, to_phase, statistic, confidence FROM events"
        where, args = [], []
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [Event(*row) for row in self._db.execute(sql + " ORDER BY time, id", args)]

    def close(self) -> None:
        """Commit what is written, then close."""
        self._db.commit()
        self._db.close()
