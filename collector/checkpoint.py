"""Durability: checkpoints of every job into the store, and a restarted collector's resume.

With a store, the collector checkpoints (`Checkpointer.checkpoint`, every
`--checkpoint-interval` seconds): each job that changed writes the history rows and events its
frames produced since its last checkpoint (kept in memory until then: `pipeline.Unsaved`), its
marks and its state (`STATE`: pending steps, last merged step, thermometer, phase detector,
counters; `TABLES` when a hello changed them, pickled) into the store's open transaction, which
then commits. Only then does the servicer tell each stream how far it is durable (`Ack.durable`,
from `job.Marks`); its agent keeps the frames above that in its spool. So a collector killed at
any point and restarted on the same database, which restores a job when its first agent says
hello (`Checkpointer.resume`), resumes from its last checkpoint, and the agents' replays bring
exactly the frames after it: none lost, none applied twice (a replayed frame the checkpoint
already holds is a duplicate).

The pickles name classes by module path, so a database outlives a move of its classes only
through `MOVED`: `loads` finds each class where it lives now.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import pickle
import sqlite3
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .job import Job
from .store import EventStore

log = logging.getLogger("thermoscope.collector")

#: Seconds a stream that ends waits for others to end before the checkpoint they share.
CHECKPOINT_BATCH = 0.05
#: The job state each checkpoint writes, by its names in the database (a file format: these
#: names are what databases hold, not attribute names) ...
STATE = (
    "reading",
    "detector",
    "transitions",
    "last_transition_time",
    "frames_received",
    "frames_late",
    "frames_duplicate",
    "_pending",
    "_merged_step",
    "_thermometer",
)
#: ... and what it writes when an agent's hello changed them.
TABLES = ("layers", "sites", "bins", "_tables")
#: Modules whose pickled classes moved, as databases of earlier releases name them -> now.
MOVED = {
    "thermoscope.agent.derive": "thermoscope.science.derive",
    "thermoscope.agent.physics": "thermoscope.science.physics",
    "thermoscope.agent.stats": "thermoscope.science.stats",
}

_dumps = functools.partial(pickle.dumps, protocol=pickle.HIGHEST_PROTOCOL)


class _Unpickler(pickle.Unpickler):
    """Finds each class where it lives now (`MOVED`)."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(MOVED.get(module, module), name)


def loads(data: bytes) -> Any:
    """Unpickle what a checkpoint of this release or an earlier one wrote."""
    return _Unpickler(io.BytesIO(data)).load()


def _holders(job: Job) -> dict[str, tuple[object, str]]:
    """Each name of `STATE` and `TABLES` -> the object and attribute that hold it in `job`."""
    p, d = job.pipeline, job.pipeline.declared
    return {
        "reading": (p, "reading"),
        "detector": (p, "detector"),
        "transitions": (p, "transitions"),
        "last_transition_time": (p, "last_transition_time"),
        "frames_received": (job, "frames_received"),
        "frames_late": (job, "frames_late"),
        "frames_duplicate": (job, "frames_duplicate"),
        "_pending": (p, "pending"),
        "_merged_step": (p, "merged_step"),
        "_thermometer": (p, "thermometer"),
        "layers": (d, "layers"),
        "sites": (d, "sites"),
        "bins": (d, "bins"),
        "_tables": (d, "by_rank"),
    }


@dataclass(frozen=True)
class Saved:
    """What a checkpoint wrote of a job into the open transaction: once it commits, so many of
    its unsaved history rows and events are durable, and these marks."""

    job: Job
    history: int
    events: int
    marks: dict[tuple[str, int], tuple[int, int]]


class Checkpointer:
    """Checkpoints of the collector's jobs into its store (none without a store): one at a time,
    each of one commit, rolled back whole if it fails (see the module docstring)."""

    def __init__(self, jobs: Mapping[str, Job], store: EventStore | None) -> None:
        self.jobs = jobs
        self.store = store
        self.written: list[Saved] = []  # jobs the running checkpoint wrote, not committed yet
        self._failing = False  # the last checkpoint could not commit (logged once)
        self._history_errors: Counter[str] = Counter()  # by job: history rows refused (logged once)
        self._lock = asyncio.Lock()  # one checkpoint at a time (it binds to the loop at first use)
        self._soon: asyncio.Task | None = None  # the checkpoint `soon` callers share

    def resume(self, job: Job) -> None:
        """Carry a new `job` on from the marks and state the store kept for it (a restarted
        collector), if they are of the run whose agent said hello first: a job id can come back
        for another run (Ray numbers jobs per cluster, so a new cluster's first job is
        `01000000` again), and that run must not inherit the old one's phases and counters."""
        store = self.store
        if store is None:
            return
        try:
            marks, state, tables = store.load_job(job.job_id)
            if marks and job.run_id not in {run for run, _ in marks}:
                log.info("job %s: its saved state is of another run, starting afresh", job.job_id)
                return
            restored = {} if state is None or tables is None else {**loads(tables), **loads(state)}
        except (sqlite3.Error, pickle.UnpicklingError, AttributeError, ImportError, EOFError) as exc:
            log.error(
                "job %s: cannot resume its state from %s, starting afresh: %s", job.job_id, store.path, exc
            )
            return
        job.marks.applied.update(marks)
        job.marks.durable.update(marks)
        holders = _holders(job)
        for name in (*TABLES, *STATE):
            if name in restored:
                setattr(*holders[name], restored[name])
        if restored:
            log.info("job %s: resumed after step %d from %s", job.job_id, job.merged_step, store.path)

    async def checkpoint(self) -> None:
        """Return once a checkpoint that began after the call has committed: every job changed
        since the last one saves its history rows, events, marks and state, and one commit
        makes them durable. Each stream's next ack says how far its frames are durable (no
        message of its own: an agent learns it with its next frame, or at its stream's end; on
        a new stream, with its first frame, replayed or not: `Job.durable`).

        Streams go on between two jobs' saves (each job's save is of one moment), so a
        checkpoint of many jobs does not hold every stream at once; checkpoints run one at a
        time (`soon` lets many callers share one). A commit that fails (a full disk) is rolled
        back and logged once until one succeeds; no stream's durable mark moves, and agents
        keep holding the frames."""
        if self.store is None:
            return
        async with self._lock:
            await self._checkpoint(self.store)

    async def soon(self) -> None:
        """`checkpoint`, shared by every caller of the next `CHECKPOINT_BATCH` seconds: when a
        job's ranks all finish at once, their streams' ends make one checkpoint, not one each."""
        if self._soon is None:
            self._soon = asyncio.create_task(self._checkpoint_after(CHECKPOINT_BATCH))
        await asyncio.shield(self._soon)

    async def every(self, interval: float) -> None:
        """Checkpoint every `interval` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await self.checkpoint()

    async def _checkpoint_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._soon = None  # a caller from now on may have applied frames this checkpoint misses
        await self.checkpoint()

    async def _checkpoint(self, store: EventStore) -> None:
        try:
            for job in list(self.jobs.values()):
                saved = self._write(job, store)
                if saved is not None:
                    self.written.append(saved)
                    await asyncio.sleep(0)
            store.commit()
        except BaseException as exc:  # a database error, or cancelled midway (the collector stops)
            store.rollback()
            for saved in self.written:  # all of it again, next time
                saved.job.dirty = saved.job.tables_dirty = True
            self.written.clear()
            if not isinstance(exc, sqlite3.Error):
                raise
            if not self._failing:
                log.error("checkpoint to %s failed, agents keep their frames: %s", store.path, exc)
            self._failing = True
            return
        self._failing = False
        for saved in self.written:
            unsaved = saved.job.pipeline.unsaved
            del unsaved.history[: saved.history], unsaved.events[: saved.events]
            saved.job.marks.durable = saved.marks
        self.written.clear()

    def _write(self, job: Job, store: EventStore) -> Saved | None:
        """If the job changed since its last checkpoint, write into the store's open transaction
        its new history rows and events, its marks and its state: all of one moment, so other
        jobs' frames may come in before the commit."""
        if not job.dirty:
            return None
        unsaved = job.pipeline.unsaved
        for reading in unsaved.history:
            try:
                store.add_reading(job.job_id, reading)
            except sqlite3.Error as exc:  # the history is a record: losing a row must not stop ingest
                self._history_errors[job.job_id] += 1
                if self._history_errors[job.job_id] == 1:
                    log.error("job %s: cannot keep its history in %s: %s", job.job_id, store.path, exc)
        store.add(unsaved.events)
        holders = _holders(job)
        state = _dumps({name: getattr(*holders[name]) for name in STATE})
        tables = _dumps({name: getattr(*holders[name]) for name in TABLES}) if job.tables_dirty else None
        store.save_job(job.job_id, job.marks.applied, state, tables)
        job.dirty = job.tables_dirty = False
        return Saved(job, len(unsaved.history), len(unsaved.events), dict(job.marks.applied))
