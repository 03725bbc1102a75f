"""Merge the ranks and shards of a job into one sample per step, then derive its readings.

Each rank's Hello fixes its layer table. A layer name held whole by several ranks (data
parallel replicas) is counted once, from the lowest rank; a layer split into shards
(FSDP, ZeRO: `Shard{index, count}`) is the exact Chan merge of one copy of each shard, and
its work dots add up. A layer missing a shard at a step is NaN for that step. Energy is the
mean of the ranks' losses; activation sites pool every rank's batch.

A step is merged once every rank the job waits for has sent it: the connected ranks, and
the ranks of its `world_size` that have not connected yet (agents that find their collector
by discovery connect up to an interval apart); or, once all ranks have connected, when every
connected rank has moved past it (a rank that skipped it, or left). Waiting is bounded:
beyond MAX_PENDING_STEPS steps the oldest is merged with the ranks it has. A frame arriving
for a step that was already merged is counted as late and not applied. So a rank that comes back (a worker
restarted from a checkpoint, its step counter replaying steps already merged) counts nothing
twice.

Liveness: a rank is *stale* when its stream ended abnormally (cancelled, connection broken,
refused) or when its open stream sent nothing for `stale_after` seconds while its job was not
paused; a rank whose stream ended cleanly (the agent half-closed: it finished) is neither:
it is only kept in `Job.finished`, for the record.
Silence is judged when someone looks (a scrape, a snapshot, the rank's next frame), so no
timer runs; each time a rank goes stale counts once in `ranks_lost`. The liveness state is
read from the metrics thread, so it is kept under `Job.lock`; everything else is the event
loop's.

No frame lost, none counted twice. Agents number their frames (`seq` 1, 2, 3... per agent
process) and, with a spool, replay the ones not acknowledged after a reconnect. A job keeps
the (seq, step) of the last frame it applied per (run, rank) (`Job.marks`): a frame at or
below both is a duplicate, counted in `frames_duplicate` and acknowledged, never applied.
A frame numbered 1 starts an agent process: unless it is the very frame of the mark (a
replay of an agent whose first frame was never acknowledged), it is a worker restarted under
the same run id (Ray Train keeps it) and the mark starts over; its frames replaying steps
already merged are then late, as without a mark. (Were the acks of several first frames all
lost, their replay would count them late a second time: counters only, since a step merges
once and a pending step takes a rank's frame idempotently.)
With a store, the collector checkpoints (`Job.checkpoint`, every `--checkpoint-interval`
seconds): each job that changed writes the history rows and events its frames produced since
its last checkpoint (kept in memory until then), its marks and its state (`_STATE`: pending
steps, last merged step, thermometer, phase detector, counters; `_TABLES` when a hello
changed them) into the store's open transaction, which then commits. Only then does the
servicer tell each stream how far it is durable
(`Ack.durable`); its agent keeps the frames above that in its spool. So a collector killed at
any point and restarted on the same database, which restores a job when its first agent
says hello, resumes from its last checkpoint, and the agents' replays bring exactly the
frames after it: none lost, none applied twice (a replayed frame the checkpoint already
holds is a duplicate).
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from thermoscope.science import physics
from thermoscope.science.derive import Reading, Thermometer
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats
from thermoscope.wire.codec import WireError

from .detect import PhaseDetector
from .store import Event, EventStore

log = logging.getLogger("thermoscope.collector")

#: Steps a job holds unmerged while waiting for slow ranks, before merging the oldest anyway.
MAX_PENDING_STEPS = 32
#: What a job persists at each checkpoint, to resume from after a restart (see the module docstring).
_STATE = (
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
#: ... and when an agent's hello changed them.
_TABLES = ("layers", "sites", "bins", "_tables")


@dataclass
class Stream:
    """One connected agent."""

    job_id: str
    run_id: str
    rank: int
    world_size: int
    host: str
    local_rank: int
    node: str
    every: int
    layers: list[LayerInfo]
    sites: list[SiteInfo]
    bins: int
    last_step: int = -1
    last_seq: int = 0
    frames: int = 0
    heard: float = field(default_factory=time.monotonic)  # when it last sent (or was unpaused)
    stale: bool = False  # stale at the last look: its silence was counted in `Job.ranks_lost`


@dataclass(frozen=True)
class Liveness:
    """Who is streaming for a job, at one moment."""

    ranks: dict[int, tuple[Stream, bool]]  # open and lost ranks: the (last) stream, stale
    connected: int  # open streams that are not stale
    lost_total: int  # times a rank of the job went stale


@dataclass
class Job:
    """Everything the collector knows about one training job."""

    job_id: str
    window: int
    store: EventStore | None = None  # where phase transitions are kept
    run_id: str = ""  # the run of the agent that opened the job: it resumes only its own run's state
    on_reading: Callable[[str, Reading], None] | None = None  # told (job_id, reading) at each merged step
    stale_after: float = 60.0  # seconds of silence after which an open stream's rank is stale
    paused: bool = False  # the collector asked the job's agents to stop sampling
    streams: dict[int, Stream] = field(default_factory=dict)  # by rank, open streams only
    lost: dict[int, Stream] = field(default_factory=dict)  # by rank: streams that ended abnormally
    finished: dict[int, Stream] = field(default_factory=dict)  # by rank: streams that ended cleanly
    ranks_lost: int = 0  # times a rank went stale
    frames_received: int = 0
    frames_late: int = 0
    frames_duplicate: int = 0  # replayed frames already applied: acknowledged, not applied again
    marks: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)  # (run, rank) -> (seq, step)
    durable_marks: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)  # marks committed
    history_errors: int = 0  # history rows the database refused (logged once)
    layers: dict[str, LayerInfo] = field(default_factory=dict)  # by name, as first declared
    sites: dict[str, SiteInfo] = field(default_factory=dict)
    bins: int = 0
    reading: Reading | None = None
    detector: PhaseDetector | None = None
    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)  # job-scope (from, to)
    last_transition_time: float | None = None
    last_seen: float = 0.0
    _tables: dict[int, tuple[list[LayerInfo], list[SiteInfo]]] = field(default_factory=dict)
    _pending: dict[int, dict[int, Sample]] = field(default_factory=dict)
    _merged_step: int = -1
    _thermometer: Thermometer | None = None
    _plans: MergePlans = field(default_factory=lambda: MergePlans(), repr=False)  # a cache, not state
    dirty: bool = False  # changed since its last checkpoint
    tables_dirty: bool = False  # its layer or site tables changed since its last checkpoint
    # what the next checkpoint writes with the state: history rows (readings) and events
    _unsaved_history: list[Reading] = field(default_factory=list, repr=False)
    _unsaved_events: list[Event] = field(default_factory=list, repr=False)
    _saving: tuple[int, int, dict] | None = field(default=None, repr=False)  # see `checkpoint`
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._resume()

    def _resume(self) -> None:
        """Carry on from the marks and state the store kept for this job (a restarted collector),
        if they are of the run whose agent said hello first: a job id can come back for another
        run (Ray numbers jobs per cluster, so a new cluster's first job is `01000000` again), and
        that run must not inherit the old one's phases and counters."""
        if self.store is None:
            return
        try:
            marks, state, tables = self.store.load_job(self.job_id)
            if marks and self.run_id not in {run for run, _ in marks}:
                log.info("job %s: its saved state is of another run, starting afresh", self.job_id)
                return
            restored = (
                {} if state is None or tables is None else {**pickle.loads(tables), **pickle.loads(state)}
            )
        except (sqlite3.Error, pickle.UnpicklingError, AttributeError, ImportError, EOFError) as exc:
            log.error(
                "job %s: cannot resume its state from %s, starting afresh: %s",
                self.job_id,
                self.store.path,
                exc,
            )
            return
        self.marks.update(marks)
        self.durable_marks.update(marks)
        for name in (*_TABLES, *_STATE):
            if name in restored:
                setattr(self, name, restored[name])
        if restored:
            log.info("job %s: resumed after step %d from %s", self.job_id, self._merged_step, self.store.path)

    def checkpoint(self) -> bool:
        """If the job changed since its last checkpoint (True), write into the store's open
        transaction its new history rows and events, its marks and its state: all of one moment,
        so the caller may let other jobs' frames in before it commits (then calls `committed`,
        or `uncommitted` if the commit failed)."""
        if self.store is None or not self.dirty:
            return False
        for reading in self._unsaved_history:
            try:
                self.store.add_reading(self.job_id, reading)
            except sqlite3.Error as exc:  # the history is a record: losing a row must not stop ingest
                self.history_errors += 1
                if self.history_errors == 1:
                    log.error("job %s: cannot keep its history in %s: %s", self.job_id, self.store.path, exc)
        self.store.add(self._unsaved_events)
        dump = functools.partial(pickle.dumps, protocol=pickle.HIGHEST_PROTOCOL)
        tables = dump({name: getattr(self, name) for name in _TABLES}) if self.tables_dirty else None
        self.store.save_job(
            self.job_id, self.marks, dump({name: getattr(self, name) for name in _STATE}), tables
        )
        self._saving = (len(self._unsaved_history), len(self._unsaved_events), dict(self.marks))
        self.dirty = self.tables_dirty = False
        return True

    def committed(self) -> None:
        """The checkpoint that saved this job committed: its frames so far are durable."""
        if self._saving is None:
            return
        history, events, self.durable_marks = self._saving
        del self._unsaved_history[:history], self._unsaved_events[:events]
        self._saving = None

    def uncommitted(self) -> None:
        """The checkpoint that saved this job was rolled back: the next one writes it all again."""
        if self._saving is not None:
            self._saving = None
            self.dirty = self.tables_dirty = True

    def durable(self, stream: Stream) -> int:
        """The highest seq of this rank's agent process that a committed checkpoint holds."""
        return self.durable_marks.get((stream.run_id, stream.rank), (0, 0))[0]

    @property
    def agents_connected(self) -> int:
        """Open streams that are not stale."""
        return self.liveness().connected

    @property
    def merged_step(self) -> int:
        """The last step merged (-1: none yet)."""
        return self._merged_step

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def site_names(self) -> list[str]:
        return list(self.sites)

    def open(self, stream: Stream) -> None:
        """Add an agent; its histogram edges must match what other ranks declared (WireError)."""
        if self.bins and stream.bins != self.bins:
            raise WireError(
                "edges_mismatch", f"histogram_bins {stream.bins}; this job's ranks use {self.bins}"
            )
        for layer in stream.layers:
            known = self.layers.get(layer.name)
            if known is not None and (known.hist_lo, known.hist_hi) != (layer.hist_lo, layer.hist_hi):
                raise WireError(
                    "edges_mismatch",
                    f"layer {layer.name!r}: histogram edges [{layer.hist_lo}, {layer.hist_hi}) differ from "
                    f"[{known.hist_lo}, {known.hist_hi}) declared by another rank",
                )
        self.bins = stream.bins
        self.dirty = self.tables_dirty = True
        with self.lock:
            self.streams[stream.rank] = stream  # a rank that comes back is live again
            self.lost.pop(stream.rank, None)
            self.finished.pop(stream.rank, None)
        self._tables[stream.rank] = (stream.layers, stream.sites)
        for layer in stream.layers:
            self.layers.setdefault(layer.name, layer)
        for site in stream.sites:
            self.sites.setdefault(site.name, site)
        self.last_seen = time.time()

    def close(self, stream: Stream, clean: bool = True) -> None:
        """The stream ended: cleanly (the rank finished) or not (the rank is stale until it returns).

        A stream that another one of its rank already replaced changes nothing.
        """
        with self.lock:
            if self.streams.get(stream.rank) is stream:
                del self.streams[stream.rank]
                if clean:
                    stream.stale = False
                    self.finished[stream.rank] = stream
                else:
                    if not self._judge(stream, time.monotonic()):  # not already stale by silence
                        self.ranks_lost += 1
                    stream.stale = True
                    self.lost[stream.rank] = stream
        self._merge_ready()
        self.dirty = True

    def liveness(self, now: float | None = None) -> Liveness:
        """The staleness of every rank not finished, now (counting ranks that have just gone stale)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            ranks = {rank: (s, self._judge(s, now)) for rank, s in self.streams.items()}
            connected = sum(not stale for _, stale in ranks.values())
            ranks.update((rank, (s, True)) for rank, s in self.lost.items())
            return Liveness(dict(sorted(ranks.items())), connected, self.ranks_lost)

    def set_paused(self, paused: bool, now: float | None = None) -> None:
        """Pause or resume the job's agents: paused ranks are not stale for their silence."""
        now = time.monotonic() if now is None else now
        with self.lock:
            if paused == self.paused:
                return
            for s in self.streams.values():
                if paused:
                    self._judge(s, now)  # a silence that had already gone on too long still counts
                else:
                    s.heard, s.stale = now, False  # the silence clock starts at the resume
            self.paused = paused

    def _judge(self, stream: Stream, now: float) -> bool:
        """Is the open `stream` stale at `now`? Counts it when it has just gone stale (lock held)."""
        stale = not self.paused and now - stream.heard > self.stale_after
        if stale and not stream.stale:
            self.ranks_lost += 1
        stream.stale = stale
        return stale

    def accept(self, stream: Stream, sample: Sample) -> bool:
        """Take one rank's sample, numbered `stream.last_seq` (0: unnumbered); merge every step
        that became complete. False: a duplicate of a frame already applied (not applied again).
        The job's next checkpoint makes it durable."""
        now = time.monotonic()
        with self.lock:
            if self.streams.get(stream.rank) is stream:
                self._judge(stream, now)  # a silence no one looked at still counts
            stream.heard, stream.stale = now, False
        self.last_seen = time.time()
        key, seq = (stream.run_id, stream.rank), stream.last_seq
        if seq == 1 and self.marks.get(key, (1, sample.step)) != (1, sample.step):
            del self.marks[key]  # a new agent process of the same run: its numbering starts over
            self.durable_marks.pop(key, None)
        last_seq, last_step = self.marks.get(key, (0, -1))
        if seq and seq <= last_seq and sample.step <= last_step:
            self.frames_duplicate += 1
            return False
        if seq:
            self.marks[key] = (seq, sample.step)
        self._take(stream, sample)
        self.dirty = True
        return True

    def _take(self, stream: Stream, sample: Sample) -> None:
        self.frames_received += 1
        stream.frames += 1
        stream.last_step = max(stream.last_step, sample.step)
        if sample.step <= self._merged_step:
            self.frames_late += 1
            return
        self._pending.setdefault(sample.step, {})[stream.rank] = sample
        self._merge_ready()

    def _merge_ready(self) -> None:
        world = max((s.world_size for s in self.streams.values()), default=0)
        unseen = sum(rank < world for rank in self._tables) < world  # an announced rank never connected
        horizon = min((s.last_step for s in self.streams.values()), default=math.inf)
        for step in sorted(self._pending):
            parts = self._pending[step]
            complete = not unseen and (self.streams.keys() <= parts.keys() or step < horizon)
            if not (complete or len(self._pending) > MAX_PENDING_STEPS):
                break
            del self._pending[step]
            self._apply(merge_step(step, parts, self._tables, self.layer_names, self.site_names, self._plans))

    def _apply(self, sample: Sample) -> None:
        th = self._thermometer
        if th is None or th.layer_names != tuple(self.layers) or th.site_names != tuple(self.sites):
            th = self._thermometer = Thermometer(
                list(self.layers.values()), list(self.sites.values()), window=self.window
            )
        self.reading = th.update(sample)
        self._merged_step = sample.step
        if self.on_reading is not None:
            self.on_reading(self.job_id, self.reading)
        if self.store is not None and self.store.due(self.job_id, self.reading):
            self._unsaved_history.append(self.reading)
        self._detect(sample)

    def _detect(self, sample: Sample) -> None:
        """Update the phases from the new reading; keep and count what changed."""
        reading = self.reading
        if self.detector is None or len(self.detector.layers) != len(reading.layer_names):
            before, self.detector = self.detector, PhaseDetector(len(reading.layer_names))
            if before is not None:  # a rank brought layers: the job's phase goes on, its layers start over
                self.detector.job = before.job
        per_value = reading.layer_entropy / np.maximum(sample.layers.count, 1)
        changes = self.detector.update(sample.step, reading.energy, per_value)
        events = [
            Event(
                job=self.job_id,
                scope="job" if c.series < 0 else "layer",
                layer="" if c.series < 0 else reading.layer_names[c.series],
                step=c.step,
                time=sample.wall_time,
                from_=c.before,
                to=c.after,
                statistic=c.statistic,
                confidence=c.confidence,
            )
            for c in changes
        ]
        for e in events:
            if e.scope == "job":
                self.transitions[(e.from_, e.to)] += 1
                self.last_transition_time = e.time
        if self.store is not None:
            self._unsaved_events.extend(events)


#: Plans a job keeps (one per set of ranks that sent a step; usually one): more are dropped.
MAX_PLANS = 8

Tables = dict[int, tuple[list[LayerInfo], list[SiteInfo]]]


@dataclass(frozen=True, eq=False)
class MergePlan:
    """What merging a step of one set of ranks takes from their tables alone, worked out once.

    The tables change only when a rank says hello, while a job merges a step every second or
    more often: the destinations, the replica de-duplication (`np.unique`) and the expected
    shard coverage would otherwise be recomputed at every step, over Python lists of every
    layer. `merge_step` applies a plan; `MergePlans` keeps a job's.
    """

    ranks: tuple[int, ...]
    tables: tuple[tuple[list[LayerInfo], list[SiteInfo]], ...]  # the ranks' entries: compared by identity
    layer_names: list[str]
    site_names: list[str]
    #: per rank that contributes: (rank, its kept layer rows or None: all, their job layers or
    #: None: its rows are the job's layers in order)
    rows: tuple[tuple[int, np.ndarray | None, np.ndarray | None], ...]
    dest: np.ndarray  # the kept rows' job layers, in the order of `rows`
    nan_if_missing: np.ndarray  # NaN where a layer misses a shard, else 1
    site_dest: np.ndarray  # every rank's site rows' job sites, in rank order

    @classmethod
    def build(
        cls, ranks: tuple[int, ...], tables: Tables, layer_names: list[str], site_names: list[str]
    ) -> MergePlan:
        """The plan for a step sent by `ranks` (sorted), from scratch."""
        layer_pos = {name: j for j, name in enumerate(layer_names)}
        site_pos = {name: j for j, name in enumerate(site_names)}
        # Layers: one contribution per (layer, shard index), from the lowest rank holding it.
        dest, shard, shards, offsets = [], [], [], [0]
        for r in ranks:
            layers = tables[r][0]
            dest.append([layer_pos[layer.name] for layer in layers])
            shard.append([layer.shard_index for layer in layers])
            shards.append([layer.shard_count for layer in layers])
            offsets.append(offsets[-1] + len(layers))
        dest_a, shard_a, shards_a = (np.concatenate(x).astype(np.int64) for x in (dest, shard, shards))
        width = int(shards_a.max()) + 1
        _, first = np.unique(dest_a * width + shard_a, return_index=True)
        keep = np.zeros(len(dest_a), dtype=bool)
        keep[first] = True
        n_layers = len(layer_names)
        rows = []
        for r, (lo, hi) in zip(ranks, pairwise(offsets), strict=True):
            kept = np.flatnonzero(keep[lo:hi])
            to = dest_a[lo:hi][kept]
            if len(kept):
                everything = len(kept) == hi - lo
                in_order = len(to) == n_layers and (to == np.arange(n_layers)).all()
                rows.append((r, None if everything else kept, None if in_order else to))
        d = dest_a[keep]
        expected = np.zeros(n_layers, dtype=np.int64)
        expected[d] = shards_a[keep]
        missing = np.bincount(d, minlength=n_layers) != expected
        site_dest = [site_pos[s.name] for r in ranks for s in tables[r][1]]
        return cls(
            ranks=ranks,
            tables=tuple(tables[r] for r in ranks),
            layer_names=list(layer_names),
            site_names=list(site_names),
            rows=tuple(rows),
            dest=d,
            nan_if_missing=np.where(missing, np.nan, 1.0),
            site_dest=np.asarray(site_dest, dtype=np.int64),
        )

    def fits(self, tables: Tables, layer_names: list[str], site_names: list[str]) -> bool:
        """Was it made from these very tables and these names?"""
        return (
            all(tables.get(r) is held for r, held in zip(self.ranks, self.tables, strict=True))
            and layer_names == self.layer_names
            and site_names == self.site_names
        )


class MergePlans:
    """A job's merge plans by the set of ranks of a step, rebuilt when a table or name changed."""

    def __init__(self) -> None:
        self._plans: dict[tuple[int, ...], MergePlan] = {}

    def get(
        self, ranks: tuple[int, ...], tables: Tables, layer_names: list[str], site_names: list[str]
    ) -> MergePlan:
        plan = self._plans.get(ranks)
        if plan is None or not plan.fits(tables, layer_names, site_names):
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()  # rank sets that come and go (ranks lost, steps forced out)
            plan = self._plans[ranks] = MergePlan.build(ranks, tables, layer_names, site_names)
        return plan


def merge_step(
    step: int,
    parts: dict[int, Sample],
    tables: Tables,
    layer_names: list[str],
    site_names: list[str],
    plans: MergePlans | None = None,
) -> Sample:
    """One job-wide sample from the ranks' samples of one step (see module docstring).

    `plans`: the job's plans, reused while its tables stay the same; without, one is made
    for this step. Either way the result is, bit for bit, that of merging the concatenated
    columns of every rank, masked to the kept rows (bincount for the float sums, in rank
    order; np.add.at for the histograms).
    """
    ranks = tuple(sorted(parts))
    plan = (
        plans.get(ranks, tables, layer_names, site_names)
        if plans is not None
        else MergePlan.build(ranks, tables, layer_names, site_names)
    )
    n_layers, d = len(layer_names), plan.dest

    def kept(field: str) -> np.ndarray:
        cols = [
            getattr(parts[r].layers, field) if rows is None else getattr(parts[r].layers, field)[rows]
            for r, rows, _ in plan.rows
        ]
        return cols[0] if len(cols) == 1 else np.concatenate(cols)

    n, mean, m2 = physics.merge_moments_grouped(d, kept("count"), kept("mean"), kept("m2"), n_layers)
    nan_if_missing = plan.nan_if_missing
    merged_hist = None  # ranks sample in step, so they take their histograms on the same steps
    if all(parts[r].layers.histogram is not None for r in ranks):
        # Integer sums, so any order gives what np.add.at over all kept rows gives; a rank
        # holds a layer once, so its rows scatter to distinct layers.
        for i, (r, rows, to) in enumerate(plan.rows):
            hist = parts[r].layers.histogram
            hist = hist if rows is None else hist[rows]
            if i == 0:
                merged_hist = np.zeros((n_layers, hist.shape[1]), dtype=np.int64)
            if to is None:
                merged_hist += hist
            else:
                merged_hist[to] += hist
    layers = LayerStats(
        count=n.astype(np.int64),
        mean=mean * nan_if_missing,
        m2=m2 * nan_if_missing,
        dot_before=np.bincount(d, kept("dot_before"), n_layers) * nan_if_missing,
        dot_after=np.bincount(d, kept("dot_after"), n_layers) * nan_if_missing,
        histogram=merged_hist,
    )

    # Sites: every rank's batch is a disjoint part of the job's batch.
    site_dest = plan.site_dest
    scat = {
        f: np.concatenate([getattr(parts[r].sites, f) for r in ranks])
        for f in ("count", "in_mean", "in_m2", "out_mean", "out_m2", "probe_spread")
    }
    n_sites = len(site_names)
    sn, in_mean, in_m2 = physics.merge_moments_grouped(
        site_dest, scat["count"], scat["in_mean"], scat["in_m2"], n_sites
    )
    probe = np.full(n_sites, -1.0)  # any rank whose probe moved makes the site temperature-dependent
    np.maximum.at(probe, site_dest, scat["probe_spread"])
    _, out_mean, out_m2 = physics.merge_moments_grouped(
        site_dest, scat["count"], scat["out_mean"], scat["out_m2"], n_sites
    )

    energies = [parts[r].energy for r in ranks if parts[r].has_energy]
    return Sample(
        step=step,
        wall_time=max(parts[r].wall_time for r in ranks),
        energy=_mean(energies),
        layers=layers,
        sites=SiteStats(sn.astype(np.int64), in_mean, in_m2, out_mean, out_m2, probe),
    )


def _mean(values: list[float]) -> float:
    """np.mean's value (the same pairwise sum, divided by the count), without its overhead; NaN if empty."""
    return float(np.add.reduce(np.array(values, dtype=np.float64))) / len(values) if values else math.nan
