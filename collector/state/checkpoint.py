"""Durability: checkpoints of every run into the store, and a restarted collector's resume.

With a store, the collector checkpoints (`Checkpointer.checkpoint`, every
`--checkpoint-interval` seconds): each run that changed writes the history rows and events its
frames produced since its last checkpoint (kept in memory until then: `pipeline.Unsaved`), its
marks and its state (`schema.STATE`: pending steps, last merged step, thermometer, phase
detector, counters; `schema.TABLES` when a frame bound new tables) in the explicit format of
schema.py, into the store's open transaction, which then commits. Only then does the servicer
tell each stream how far it is durable (`Ack.durable`, from `job.Marks`); its agent keeps the
frames above that in its spool. So a collector killed at any point and restarted on the same
database, which restores a run when its first agent says hello (`Checkpointer.resume`),
resumes from its last checkpoint, and the agents' replays bring exactly the frames after it:
none lost, none applied twice (a replayed frame the checkpoint already holds is a duplicate).

A frame is durable only when a commit that holds every row of its checkpoint succeeded: any
error while writing one (a full disk: SQLite may even roll the transaction back by itself, after
which later statements would commit on their own) rolls the whole checkpoint back, keeps its
rows in memory for the next one, and moves no durable mark; while checkpoints fail,
`failing` is set and `on_failing` told (the collector's health says NOT_SERVING), and told
again when one succeeds.

A run's stored state that cannot be read (of a newer format, or damaged) is never replaced by a
fresh start, which would drop what it held: `resume` refuses the run's agents (WireError
`state_unreadable`, logged) until the database is fixed or the collector upgraded.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from thermoscope.wire.codec import WireError

from . import schema
from .job import Job
from .store import EventStore

log = logging.getLogger("thermoscope.collector")

#: Seconds a stream that ends waits for others to end before the checkpoint they share.
CHECKPOINT_BATCH = 0.05


def _holders(job: Job) -> dict[str, tuple[object, str]]:
    """Each name of `schema.STATE` and `schema.TABLES` -> the object and attribute that hold it."""
    p, d = job.pipeline, job.pipeline.declared
    return {
        "reading": (p, "reading"),
        "detector": (p, "detector"),
        "transitions": (p, "transitions"),
        "last_transition_time": (p, "last_transition_time"),
        "frames_received": (job, "frames_received"),
        "frames_late": (job, "frames_late"),
        "frames_duplicate": (job, "frames_duplicate"),
        "first": (job.marks, "first"),
        "pending": (p, "pending"),
        "merged_step": (p, "merged_step"),
        "thermometer": (p, "thermometer"),
        "findings": (p, "findings"),
        "layers": (d, "layers"),
        "sites": (d, "sites"),
        "bins": (d, "bins"),
        "by_rank": (d, "by_rank"),
    }


def values_of(job: Job, names: tuple[str, ...]) -> dict[str, Any]:
    """The run's live values of `names` (of `schema.STATE` or `schema.TABLES`)."""
    holders = _holders(job)
    return {name: getattr(*holders[name]) for name in names}


@dataclass(frozen=True)
class Saved:
    """What a checkpoint wrote of a job into the open transaction: once it commits, so many of
    its unsaved history rows and events are durable, and these marks."""

    job: Job
    history: int
    events: int
    marks: dict[tuple[str, int], tuple[int, int]]
    findings: int = 0


class Checkpointer:
    """Checkpoints of the collector's jobs into its store (none without a store): one at a time,
    each of one commit, rolled back whole if it fails (see the module docstring)."""

    def __init__(self, jobs: Mapping[Any, Job], store: EventStore | None) -> None:
        """`jobs`: every run held in memory (its keys are not read: each `Job` names its run)."""
        self.jobs = jobs
        self.store = store
        self.written: list[Saved] = []  # runs the running checkpoint wrote, not committed yet
        self.failing = False  # the last checkpoint could not commit (logged once until one does)
        self.on_failing: Callable[[bool], Awaitable[None]] | None = None  # told when `failing` changes
        self._lock = asyncio.Lock()  # one checkpoint at a time (it binds to the loop at first use)
        self._soon: asyncio.Task | None = None  # the checkpoint `soon` callers share

    def resume(self, job: Job) -> None:
        """Carry a new run on from the marks and state the store kept for its (job, run): a
        restarted collector's, or one that let the run go from memory. Another run of the same
        job id (Ray numbers jobs per cluster) has its own. A state that cannot be read refuses
        the run (WireError `state_unreadable`): starting it afresh would lose what it held."""
        store = self.store
        if store is None:
            return
        try:
            marks, state, tables = store.load_run(job.job_id, job.run_id)
            restored = {} if state is None else schema.decode_state(state)
            if tables is not None:
                restored |= schema.decode_tables(tables)
        except (sqlite3.Error, schema.StateError) as exc:
            reason = f"job {job.job_id} run {job.run_id!r}: its state in {store.path} cannot be read: {exc}"
            log.error("%s; its agents are refused (they keep their frames) until it can be", reason)
            raise WireError("state_unreadable", reason) from None
        job.marks.applied.update(marks)
        job.marks.durable.update(marks)
        holders = _holders(job)
        for name, value in restored.items():
            setattr(*holders[name], value)
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
            store.prune()
            store.commit()
        except BaseException as exc:  # a database error, or cancelled midway (the collector stops)
            store.rollback()
            for saved in self.written:  # all of it again, next time
                saved.job.dirty = saved.job.tables_dirty = True
            self.written.clear()
            if not isinstance(exc, sqlite3.Error):
                raise
            if not self.failing:
                log.error("checkpoint to %s failed, agents keep their frames: %s", store.path, exc)
                await self._set_failing(True)
            return
        for saved in self.written:
            unsaved = saved.job.pipeline.unsaved
            del unsaved.history[: saved.history], unsaved.events[: saved.events]
            del unsaved.findings[: saved.findings]
            saved.job.marks.durable = saved.marks
        self.written.clear()
        if self.failing:
            log.warning("checkpoint to %s succeeded again: frames are durable again", store.path)
            await self._set_failing(False)

    async def _set_failing(self, failing: bool) -> None:
        self.failing = failing
        if self.on_failing is not None:
            await self.on_failing(failing)

    def _write(self, job: Job, store: EventStore) -> Saved | None:
        """If the run changed since its last checkpoint, write into the store's open transaction
        its new history rows and events, its marks and its state: all of one moment, so other
        runs' frames may come in before the commit. Any error goes up: the checkpoint is rolled
        back whole (a history row lost would break the record the durable marks promise)."""
        if not job.dirty:
            return None
        unsaved = job.pipeline.unsaved
        for reading in unsaved.history:
            store.add_reading(job.job_id, reading)
        store.add(unsaved.events)
        store.add_findings(job.job_id, unsaved.findings)
        state = schema.encode_state(values_of(job, schema.STATE))
        tables = schema.encode_tables(values_of(job, schema.TABLES)) if job.tables_dirty else None
        store.save_run(job.job_id, job.run_id, job.marks.applied, state, tables)
        job.dirty = job.tables_dirty = False
        return Saved(
            job, len(unsaved.history), len(unsaved.events), dict(job.marks.applied), len(unsaved.findings)
        )
