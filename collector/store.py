"""Durable phase-transition events: an embedded SQLite database in WAL mode.

WAL lets `thermoscope events` read while the collector writes, and survives a crash of the
writer with every committed event intact. Events are rare (a few per job per phase change),
so each batch is one small transaction on the collector's event loop.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_HOME = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
DEFAULT_DB = STATE_HOME / "thermoscope" / "events.db"
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
"""


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

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        path = Path(path)
        if not create and not path.exists():
            raise FileNotFoundError(f"no event database at {path}")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint
        self._db.executescript(_SCHEMA)

    def add(self, events: list[Event]) -> None:
        if not events:
            return
        with self._db:
            self._db.executemany(
                "INSERT INTO events (job, scope, layer, step, time, from_phase, to_phase, statistic,"
                " confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [tuple(e.as_dict().values()) for e in events],
            )

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

    def last_phases(self, job: str) -> dict[tuple[str, str], str]:
        """The latest phase of each (scope, layer) of a job: where a restarted collector resumes."""
        rows = self._db.execute(
            "SELECT scope, layer, to_phase FROM events WHERE id IN"
            " (SELECT MAX(id) FROM events WHERE job = ? GROUP BY scope, layer)",
            (job,),
        )
        return {(scope, layer): phase for scope, layer, phase in rows}

    def close(self) -> None:
        self._db.close()
