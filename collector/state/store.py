"""Durable phase-transition events, and each job's history: an embedded SQLite database in WAL mode.

WAL lets `thermoscope events` and `thermoscope plot` read while the collector writes, and
survives a crash of the writer with every committed row intact. The collector writes at its
checkpoints only (every `--checkpoint-interval` seconds, `checkpoint.Checkpointer`): each
job that changed writes its new history rows and events with its state, and one `commit`
makes them all durable, so what is committed is always consistent with the states saved.
The history keeps what `thermoscope plot` draws — energy, entropy, temperature and every
layer's temperature (one float64 blob, in the order of the job's layer names) — at most one
row per job every `history_interval` seconds, so its size follows wall time, not step rate.
Rows older than `retention` seconds are deleted (`prune`, at most once a `PRUNE_EVERY`, with
the checkpoint that commits), and their pages given back to the file system: the database is
in incremental auto-vacuum mode (a database of an earlier release is converted once, by a
VACUUM when a collector opens it), and the commit after a prune runs `PRAGMA incremental_vacuum`.
Beside each row, `layer_history` keeps what is measurable of each layer where its temperature is
not: its share of the window's work and its entropy change (a table of its own, created when
any database opens, so that a database stays one an earlier release of its format writes to).
`findings` (created the same way) keeps each finding (docs/findings.md) as it was raised, and
as it cleared (the same row, its `cleared` step set), written at the checkpoints with the events.

It also keeps what a collector killed and restarted on the same database needs in order to
lose no frame and count none twice (`save_run` / `load_run`): per (job, run, rank) the
sequence number and step of the last frame applied (`marks`), and per (job, run) the state its
merge and phase detector resume from (`run_state`, in the explicit format of schema.py, which
checkpoint.py encodes and decodes). The marks, the states, and the history rows and events the
same frames produced commit together, so a restarted collector resumes from a state whose
events are exactly those in the database. It keeps which jobs the collector was told to pause
(`admission`: attach/detach), so a restarted collector still pauses them.

Opening checks the file before anything runs on it (`StoreError`, one line naming the file): an
existing file of zero bytes (a database that was truncated, or a path that is not ours) or a
corrupt one (`PRAGMA quick_check`), one written by a newer release (`PRAGMA user_version` above
`schema.FORMAT`), or one that lacks the tables its version has. A database of the releases that
pickled the state (version 0) is converted once (legacy.py) in the same transaction that stamps
its new version.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from thermoscope.science.derive import Reading
from thermoscope.science.findings import Finding

from ..settings import DEFAULTS
from . import legacy, schema

log = logging.getLogger("thermoscope.collector")

#: Least seconds between two prunes of the history (each deletes what aged past the retention).
PRUNE_EVERY = 60.0
#: SQLite's `auto_vacuum` value for INCREMENTAL: freed pages stay until `incremental_vacuum`.
INCREMENTAL = 2

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
CREATE TABLE IF NOT EXISTS run_state (
    job TEXT NOT NULL,
    run TEXT NOT NULL,
    state BLOB NOT NULL,  -- schema.encode_state
    tables BLOB,  -- schema.encode_tables (NULL: no frame bound them yet)
    PRIMARY KEY (job, run)
);
CREATE TABLE IF NOT EXISTS admission (
    job TEXT PRIMARY KEY,  -- NULL never: '' with is_default = 1 holds the default
    is_default INTEGER NOT NULL,
    active INTEGER NOT NULL
);
"""
#: Tables added within a format: created whenever a database opens (releases of the same format
#: that lack them neither read nor write them).
_ADDED = """
CREATE TABLE IF NOT EXISTS layer_history (
    job TEXT NOT NULL,
    step INTEGER NOT NULL,
    work_share BLOB NOT NULL,
    entropy_change BLOB NOT NULL,
    PRIMARY KEY (job, step)
);
CREATE TABLE IF NOT EXISTS findings (
    job TEXT NOT NULL,
    scope TEXT NOT NULL,
    layer TEXT NOT NULL,
    step INTEGER NOT NULL,  -- raised at
    time REAL NOT NULL,
    finding TEXT NOT NULL,
    cleared INTEGER,  -- NULL: it still holds
    statistic TEXT NOT NULL,
    value REAL,  -- NULL: NaN (no value: a non-finite row)
    confidence REAL NOT NULL,
    rank INTEGER NOT NULL,
    PRIMARY KEY (job, finding, scope, layer, step)
);
"""
#: The columns of a finding, in the contract's names (`thermoscope events --json`).
FINDING_FIELDS = (
    "job",
    "scope",
    "layer",
    "step",
    "time",
    "finding",
    "cleared",
    "statistic",
    "value",
    "confidence",
    "rank",
)
#: The tables of a database of format `schema.FORMAT`.
TABLES = ("events", "history", "layer_names", "marks", "run_state", "admission")


class StoreError(sqlite3.DatabaseError):
    """A database the collector must not run on; the message is one line naming the file."""


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
    # (steps, layers): each layer's share of the window's |work| and its entropy change (nats);
    # NaN in rows an earlier release wrote
    layer_work_share: np.ndarray | None = None
    layer_entropy_change: np.ndarray | None = None


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
        self,
        path: str | Path,
        *,
        create: bool = True,
        history_interval: float = DEFAULTS.history_interval,
        retention: float = DEFAULTS.retention,
    ) -> None:
        """Open (and with `create`, create) the database at `path`, checked (StoreError).
        `retention`: seconds of history `prune` keeps (0: all)."""
        path = Path(path)
        self.history_interval = history_interval
        self.retention = retention
        self._pruned = -math.inf  # monotonic time of the last prune
        self._vacuum = False  # whether the next commit gives pages back
        self._last_history: dict[str, float] = {}  # job -> time of its last history row
        self._names: dict[str, tuple[str, ...]] = {}
        self._admission: tuple[bool | None, dict[str, bool]] | None = None  # to write at the next commit
        if not create and not path.exists():
            raise FileNotFoundError(f"no event database at {path}")
        if path.exists() and path.stat().st_size == 0 and not Path(f"{path}-wal").exists():
            raise StoreError(
                f"{path}: an empty file (0 bytes), not a Thermoscope database; remove it to start"
            )
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError as exc:  # a file where a folder should be
                raise StoreError(f"{path}: its folder {exc.filename} is a file") from None
            except OSError as exc:
                raise StoreError(f"{path}: cannot make its folder {exc.filename}: {exc.strerror}") from None
        self.path = path
        try:
            self._db = sqlite3.connect(path, check_same_thread=False)
        except sqlite3.OperationalError as exc:  # /proc/events.db: sqlite's message names no path
            raise StoreError(f"{path}: cannot be opened ({exc})") from None
        try:
            self._open(create)
        except (sqlite3.DatabaseError, schema.StateError) as exc:
            self._db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{path}: not a usable Thermoscope database ({exc})") from None

    def _open(self, create: bool) -> None:
        """Check the file, then create, convert or verify its tables (see the module docstring);
        a writer's (`create`) also made incremental-vacuum and its history indexed by time."""
        db = self._db
        problems = [row for (row,) in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise StoreError(f"{self.path}: corrupt ({'; '.join(problems[:3])})")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > schema.FORMAT:
            raise StoreError(
                f"{self.path}: written by a newer release (format {version}; "
                f"this one reads up to {schema.FORMAT})"
            )
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == schema.FORMAT and not set(TABLES) <= tables:
            missing = ", ".join(sorted(set(TABLES) - tables))
            raise StoreError(f"{self.path}: a database of format {version} without its tables ({missing})")
        if create and db.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
            db.execute(f"PRAGMA auto_vacuum = {INCREMENTAL}")  # a new file: set before its tables
            if tables:  # an existing one: only a VACUUM changes it (once; it rewrites the file)
                log.info("%s: converting to incremental vacuum (once): pruned history frees space", self.path)
                db.execute("VACUUM")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint
        if version < schema.FORMAT:
            try:
                db.executescript(_SCHEMA)  # (commits: the tables are created before the conversion)
                legacy.migrate(db)
                db.execute(f"PRAGMA user_version = {schema.FORMAT}")
                db.commit()
            except BaseException:
                db.rollback()
                raise
        if create:
            db.execute("CREATE INDEX IF NOT EXISTS history_time ON history (time)")  # what `prune` reads
            db.commit()
        db.executescript(_ADDED)

    def commit(self) -> None:
        """Make everything written since the last commit durable, at once (with the admission
        `save_admission` was given since the last commit that succeeded)."""
        if self._admission is not None:
            default, overrides = self._admission
            self._db.execute("DELETE FROM admission WHERE is_default = 0")
            if default is not None:
                self._db.execute("INSERT OR REPLACE INTO admission VALUES ('', 1, ?)", (default,))
            self._db.executemany(
                "INSERT INTO admission VALUES (?, 0, ?)", [(job, active) for job, active in overrides.items()]
            )
        self._db.commit()
        self._admission = None
        if self._vacuum:  # the pages `prune` freed, back to the file system (outside a transaction:
            self._vacuum = False  # Python's sqlite3 runs it there only as a script)
            self._db.executescript("PRAGMA incremental_vacuum;")

    def prune(self, now: float | None = None) -> int:
        """Delete the history rows older than the retention (stamped before `now` minus it; `now`:
        the clock) and give their pages back; the rows deleted (0 also when the last prune was
        less than `PRUNE_EVERY` ago, or nothing is pruned). Part of the transaction the next
        `commit` ends."""
        if not self.retention or time.monotonic() - self._pruned < PRUNE_EVERY:
            return 0
        self._pruned = time.monotonic()
        before = (time.time() if now is None else now) - self.retention
        deleted = self._db.execute("DELETE FROM history WHERE time < ?", (before,)).rowcount
        if deleted:  # and what was kept beside those rows
            self._db.execute(
                "DELETE FROM layer_history WHERE NOT EXISTS (SELECT 1 FROM history h"
                " WHERE h.job = layer_history.job AND h.step = layer_history.step)"
            )
        self._vacuum = deleted > 0
        return deleted

    def rollback(self) -> None:
        """Forget everything written since the last commit (an admission not yet written stays)."""
        self._db.rollback()
        self._names.clear()  # the layer names written meanwhile are gone too: write them again

    def save_admission(self, default: bool | None, overrides: dict[str, bool]) -> None:
        """The jobs attached or detached (`default`: for every job, None: as stored; `overrides`:
        per job), written with the next commit (a checkpoint's)."""
        if default is None and self._admission is not None:
            default = self._admission[0]
        self._admission = (default, dict(overrides))

    def load_admission(self) -> tuple[bool | None, dict[str, bool]]:
        """The admission the last commit held: (the default or None, the per-job choices)."""
        default, overrides = None, {}
        for job, is_default, active in self._db.execute("SELECT job, is_default, active FROM admission"):
            if is_default:
                default = bool(active)
            else:
                overrides[job] = bool(active)
        return default, overrides

    def save_run(
        self,
        job: str,
        run: str,
        marks: dict[tuple[str, int], tuple[int, int]],
        state: bytes,
        tables: bytes | None,
    ) -> None:
        """Record the run's (run, rank) -> (seq, step) marks, its resumable state and, when they
        changed (None: they did not), its layer and site tables: kept apart because they change
        only when an agent's first frame binds them and cost more to encode than the rest."""
        self._db.executemany(
            "INSERT OR REPLACE INTO marks (job, run, rank, seq, step) VALUES (?, ?, ?, ?, ?)",
            [(job, mark_run, rank, seq, step) for (mark_run, rank), (seq, step) in marks.items()],
        )
        self._db.execute(
            "INSERT INTO run_state (job, run, state) VALUES (?, ?, ?)"
            " ON CONFLICT (job, run) DO UPDATE SET state = excluded.state",
            (job, run, state),
        )
        if tables is not None:
            self._db.execute("UPDATE run_state SET tables = ? WHERE job = ? AND run = ?", (tables, job, run))

    def load_run(
        self, job: str, run: str
    ) -> tuple[dict[tuple[str, int], tuple[int, int]], bytes | None, bytes | None]:
        """The run's marks, state and tables as `save_run` left them (empty, None, None: never saved)."""
        rows = self._db.execute("SELECT rank, seq, step FROM marks WHERE job = ? AND run = ?", (job, run))
        marks = {(run, rank): (seq, step) for rank, seq, step in rows}
        row = self._db.execute(
            "SELECT state, tables FROM run_state WHERE job = ? AND run = ?", (job, run)
        ).fetchone()
        return marks, *((None, None) if row is None else row)

    def add(self, events: list[Event]) -> None:
        if not events:
            return
        self._db.executemany(
            "INSERT INTO events (job, scope, layer, step, time, from_phase, to_phase, statistic,"
            " confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [tuple(e.as_dict().values()) for e in events],
        )

    def add_findings(self, job: str, findings: list[Finding]) -> None:
        """Write findings raised or cleared (a cleared one replaces the row of its raising)."""
        self._db.executemany(
            "INSERT OR REPLACE INTO findings (job, scope, layer, step, time, finding, cleared, statistic,"
            " value, confidence, rank) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    job,
                    f.scope,
                    f.layer,
                    f.step,
                    f.time,
                    f.finding,
                    f.cleared,
                    f.statistic,
                    f.value if math.isfinite(f.value) else None,
                    f.confidence,
                    f.rank,
                )
                for f in findings
            ],
        )

    def findings(
        self, job: str | None = None, since: float | None = None, finding: str | None = None
    ) -> list[dict[str, object]]:
        """Findings in time order (each with `FINDING_FIELDS`), optionally of one job, at or
        after `since` (epoch seconds), of one name."""
        where, args = [], []
        for column, value in (("job = ?", job), ("time >= ?", since), ("finding = ?", finding)):
            if value is not None:
                where.append(column)
                args.append(value)
        sql = f"SELECT {', '.join(FINDING_FIELDS)} FROM findings"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + " ORDER BY time, rowid", args)
        return [dict(zip(FINDING_FIELDS, row, strict=True)) for row in rows]

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
        if reading.layer_work_share is not None and reading.layer_entropy_change is not None:
            self._db.execute(
                "INSERT OR REPLACE INTO layer_history VALUES (?, ?, ?, ?)",
                (
                    job,
                    reading.step,
                    np.asarray(reading.layer_work_share, dtype="<f8").tobytes(),
                    np.asarray(reading.layer_entropy_change, dtype="<f8").tobytes(),
                ),
            )
        self._names[job] = reading.layer_names

    def history(self, job: str) -> History:
        """The job's history in step order (ValueError if it has none)."""
        rows = self._db.execute(
            "SELECT h.step, time, energy, entropy, temperature, energy_from_work, layer_temperature,"
            " work_share, entropy_change FROM history h LEFT JOIN layer_history l"
            " ON l.job = h.job AND l.step = h.step WHERE h.job = ? ORDER BY h.step",
            (job,),
        ).fetchall()
        names = self._db.execute("SELECT names FROM layer_names WHERE job = ?", (job,)).fetchone()
        if not rows or names is None:
            raise ValueError(f"no history of job {job!r} in {self.path}")
        layer_names = tuple(json.loads(names[0]))
        layer_t, share, change = (np.full((len(rows), len(layer_names)), np.nan) for _ in range(3))
        for i, row in enumerate(rows):
            for column, blob in ((layer_t, row[6]), (share, row[7]), (change, row[8])):
                if blob is not None:
                    values = np.frombuffer(blob, dtype="<f8")[: len(layer_names)]
                    column[i, : len(values)] = values
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
            layer_work_share=share,
            layer_entropy_change=change,
        )

    def latest_job(self, before: float = math.inf) -> str | None:
        """The job with the newest history row stamped at or before `before` (epoch seconds)."""
        row = self._db.execute(
            "SELECT job FROM history WHERE time <= ? ORDER BY time DESC LIMIT 1", (before,)
        ).fetchone()
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
