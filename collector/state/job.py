"""One training job as the collector holds it: its ranks' streams and their liveness, the marks
that keep a frame from counting twice, its frame counters, and the pipeline its frames feed.

Liveness (`Ranks`): a rank is *stale* when its stream ended abnormally (cancelled, connection
broken, refused) or when its open stream sent nothing for `stale_after` seconds while its job
was not paused; a rank whose stream ended cleanly (the agent half-closed: it finished) is
neither: it is only kept among the finished ranks, for the record. Silence is judged when
someone looks (a scrape, a snapshot, the rank's next frame), so no timer runs; each time a rank
goes stale counts once in `Liveness.lost_total`. The liveness state is read from the metrics
thread, so it is kept under `Ranks.lock`; everything else is the event loop's.

No frame lost, none counted twice (`Marks`). Agents number their frames (`seq` 1, 2, 3... per
agent process) and, with a spool, replay the ones not acknowledged after a reconnect. A job keeps
the (seq, step) of the last frame it applied per (run, rank): a frame at or below both is a
duplicate, counted in `frames_duplicate` and acknowledged, never applied. A frame numbered 1
starts an agent process: unless it is the very frame of the mark (a replay of an agent whose
first frame was never acknowledged), it is a worker restarted under the same run id (Ray Train
keeps it) and the mark starts over; its frames replaying steps already merged are then late
(`frames_late`: the pipeline merged their step already). (Were the acks of several first frames
all lost, their replay would count them late a second time: counters only, since a step merges
once and a pending step takes a rank's frame idempotently.) With a store, checkpoints make the
marks durable (checkpoint.py), and each ack says how far (`Job.durable`): never beyond the frames
the stream it answers sent, so another stream's mark frees nothing of this agent's spool.

A frame 1 is known for a replay by its step and its wall time *as the agent stamped it*: one
the collector clamped (decode puts the time of arrival in the sample) keeps its stamp, so its
replay is still a replay.

No frame leaps (`STEP_AHEAD`, `STEP_RATE`): a frame's step may run ahead of the highest step the
job applied by at most STEP_AHEAD, plus STEP_RATE a second since that step came (a long pause of
the job's agents); beyond it the frame is refused (`step_jump`) and changes nothing. A resume
from a checkpoint goes back, which is always allowed; a job with no step yet (a new job, or a
collector without its state) has no bound. So one forged frame cannot strand the job's last step
where its real ranks never reach, nor make their frames duplicates of it.

Each rank belongs to the identity that opened it (`_tenant` in server.py: a bearer token, or a
client certificate): a hello for it from another identity is refused (`rank_owned`) while it is
held; it is let go when the rank finishes (its stream ended cleanly) or the run is let go. A
rank lost (its stream broke) stays its identity's, for the worker that comes back.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from thermoscope.science.derive import Reading
from thermoscope.science.findings import Finding
from thermoscope.science.stats import LayerInfo, Sample, SiteInfo
from thermoscope.wire.codec import WireError

from ..settings import DEFAULTS
from .pipeline import Phases, Pipeline
from .stream import Stream

#: Steps a frame may run ahead of the highest step its job applied (see the module docstring) ...
STEP_AHEAD = 100_000
#: ... plus this many a second since that step came.
STEP_RATE = 10_000


@dataclass(frozen=True)
class Liveness:
    """Who is streaming for a job, at one moment."""

    ranks: dict[int, tuple[Stream, bool]]  # open and lost ranks: the (last) stream, stale
    connected: int  # open streams that are not stale
    lost_total: int  # times a rank of the job went stale
    finished: dict[int, Stream]  # ranks whose (last) stream ended cleanly
    paused: bool  # the collector asked the job's agents to stop sampling


class Ranks:
    """A job's ranks by their streams: open, lost (ended abnormally) and finished (ended cleanly),
    and whether each is stale (see the module docstring).

    A node aggregator's stream is kept under its lowest rank and speaks for each of its ranks:
    a rank its frames stop naming goes stale on its own (its last frame named it more than
    `stale_after` ago), and the stream's end counts for every one of them."""

    def __init__(self, stale_after: float, paused: bool) -> None:
        self.stale_after = stale_after  # seconds of silence after which an open stream's rank is stale
        self.paused = paused
        self.streams: dict[int, Stream] = {}  # by rank, open streams only
        self.shadowed: dict[int, list[Stream]] = {}  # by rank, open streams a later one of it replaced
        self.lost: dict[int, Stream] = {}
        self.finished: dict[int, Stream] = {}
        self.claims: dict[int, int] = {}  # rank -> the key of the open, lost or finished stream holding it
        self.lost_total = 0
        self.lock = threading.Lock()  # the metrics thread reads all of the above

    def open(self, stream: Stream) -> None:
        """A rank's stream opened: a rank that comes back is live again.

        The ranks a job's streams claim together are at most its world, each once (`claims`): a
        stream claiming a rank that another open stream holds is refused (WireError
        `rank_taken`), and an ended stream one of whose ranks it claims is let go whole (its ranks
        stream again, through it). A stream of the same key still open (an agent reconnecting
        before its old call was seen to end) is replaced, and comes back if this one ends first."""
        key, claimed = stream.rank, stream.ranks or (stream.rank,)
        with self.lock:
            taken = sorted(
                r for r in claimed if self.claims.get(r, key) != key and self.claims[r] in self.streams
            )
            if taken:
                raise WireError(
                    "rank_taken",
                    f"ranks {taken[:8]} are claimed by another open stream of job {stream.job_id!r}",
                )
            replaced = self.streams.pop(key, None)
            if replaced is not None:
                self.shadowed.setdefault(key, []).append(replaced)
            for other in {key, *(self.claims[r] for r in claimed if r in self.claims)}:
                gone = self.streams.pop(other, None) or self.lost.pop(other, None)
                gone = gone or self.finished.pop(other, None)
                for r in (gone.ranks or (other,)) if gone is not None else ():
                    if self.claims.get(r) == other:
                        del self.claims[r]
            self.claims.update(dict.fromkeys(claimed, key))
            self.streams[key] = stream
            stream.rank_heard = dict.fromkeys(stream.ranks, stream.heard)

    def close(self, stream: Stream, clean: bool) -> None:
        """The stream ended: cleanly (the rank finished) or not (the rank is stale until it returns).
        A stream that another one of its rank replaced, or that one it replaced outlives, changes
        nothing."""
        with self.lock:
            shadowed = [s for s in self.shadowed.pop(stream.rank, []) if s is not stream]
            if shadowed:
                self.shadowed[stream.rank] = shadowed
            if self.streams.get(stream.rank) is not stream:
                return
            if shadowed:  # the stream it replaced is still open: the rank streams on it
                self.streams[stream.rank] = shadowed.pop()
                if not shadowed:
                    del self.shadowed[stream.rank]
                return
            del self.streams[stream.rank]
            if stream.ranks:
                stale = self._judge_ranks(stream, time.monotonic())
                if not clean:
                    self.lost_total += sum(not s for s in stale.values())
                # an ended node stream's ranks are all finished, or all lost: no per-rank state
                stream.rank_heard, stream.stale_ranks = {}, set()
            if clean:
                stream.stale = False
                self.finished[stream.rank] = stream
            elif stream.ranks:
                stream.stale = True
                self.lost[stream.rank] = stream
            else:
                if not self._judge(stream, time.monotonic()):  # not already stale by silence
                    self.lost_total += 1
                stream.stale = True
                self.lost[stream.rank] = stream

    def heard(self, stream: Stream, now: float, ranks: tuple[int, ...] = ()) -> None:
        """The stream sent a frame at `now` (a node's: merging `ranks`): a silence no one looked
        at before still counts."""
        with self.lock:
            if stream.ranks:
                if self.streams.get(stream.rank) is stream:
                    self._judge_ranks(stream, now)
                for rank in ranks:
                    stream.rank_heard[rank] = now
                    stream.stale_ranks.discard(rank)
                stream.heard = now
                return
            if self.streams.get(stream.rank) is stream:
                self._judge(stream, now)
            stream.heard, stream.stale = now, False

    def liveness(self, now: float | None = None) -> Liveness:
        """The staleness of every rank not finished, now (counting ranks that have just gone stale)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            ranks = {rank: (s, self._judge(s, now)) for rank, s in self.streams.items() if not s.ranks}
            for s in self.streams.values():
                if s.ranks:
                    ranks.update((rank, (s, stale)) for rank, stale in self._judge_ranks(s, now).items())
            connected = sum(not stale for _, stale in ranks.values())
            ranks.update((rank, (s, True)) for key, s in self.lost.items() for rank in s.ranks or (key,))
            finished = {rank: s for key, s in self.finished.items() for rank in s.ranks or (key,)}
            return Liveness(dict(sorted(ranks.items())), connected, self.lost_total, finished, self.paused)

    def set_paused(self, paused: bool, now: float | None = None) -> None:
        """Pause or resume the job's agents: paused ranks are not stale for their silence."""
        now = time.monotonic() if now is None else now
        with self.lock:
            if paused == self.paused:
                return
            for s in self.streams.values():
                if paused and s.ranks:
                    self._judge_ranks(s, now)
                elif paused:
                    self._judge(s, now)  # a silence that had already gone on too long still counts
                else:
                    s.heard, s.stale = now, False  # the silence clock starts at the resume
                    s.rank_heard = dict.fromkeys(s.ranks, now)
            self.paused = paused

    def _judge_ranks(self, stream: Stream, now: float) -> dict[int, bool]:
        """Is each rank of the open node `stream` stale at `now`? Counts each that has just gone
        stale (lock held)."""
        stale = {}
        for rank, heard in stream.rank_heard.items():
            stale[rank] = not self.paused and now - heard > self.stale_after
            if stale[rank] and rank not in stream.stale_ranks:
                self.lost_total += 1
                stream.stale_ranks.add(rank)
            elif not stale[rank]:
                stream.stale_ranks.discard(rank)
        return stale

    def _judge(self, stream: Stream, now: float) -> bool:
        """Is the open `stream` stale at `now`? Counts it when it has just gone stale (lock held)."""
        stale = not self.paused and now - stream.heard > self.stale_after
        if stale and not stream.stale:
            self.lost_total += 1
        stream.stale = stale
        return stale


class Marks:
    """Per (run, rank): the (seq, step) of the last frame applied, and of the last one that a
    committed checkpoint holds (see the module docstring)."""

    def __init__(self) -> None:
        self.applied: dict[tuple[str, int], tuple[int, int]] = {}
        self.durable: dict[tuple[str, int], tuple[int, int]] = {}
        self.first: dict[tuple[str, int], tuple[int, float]] = {}  # (step, wall time) of the process' frame 1

    def admit(self, stream: Stream, step: int, wall_time: float) -> bool:
        """Mark the stream's frame numbered `stream.last_seq` (0: unnumbered) at `step` applied;
        False: a duplicate of a frame already applied (not marked, not to apply).

        `wall_time`: as the agent stamped it (NaN taken as -inf, so that it equals itself). A
        frame 1 stamped as the marked process's frame 1 (`first`: its step and wall time), or
        the very frame of the mark, is that process replaying from its start (it reconnected
        before it learned that a checkpoint held its frames); any other frame 1 starts a new
        process of the same run (a restarted worker, even at the same step)."""
        key, seq = (stream.run_id, stream.rank), stream.last_seq
        wall_time = -math.inf if math.isnan(wall_time) else wall_time
        replay = self.first.get(key) == (step, wall_time) or self.applied.get(key) == (1, step)
        if seq == 1 and key in self.applied and not replay:
            del self.applied[key]  # a new agent process of the same run: its numbering starts over
            self.durable.pop(key, None)
        if seq == 1:
            self.first[key] = (step, wall_time)
        last_seq, last_step = self.applied.get(key, (0, -1))
        if seq and seq <= last_seq and step <= last_step:
            return False
        if seq:
            self.applied[key] = (seq, step)
        return True

    def durable_seq(self, stream: Stream) -> int:
        """The highest seq of this rank's agent process that a committed checkpoint holds, up to
        the last frame `stream` sent (a mark another stream set frees none of its frames)."""
        return min(self.durable.get((stream.run_id, stream.rank), (0, 0))[0], stream.last_seq)


class Job:
    """Everything the collector knows about one training job.

    Lives on the collector's event loop; `liveness`, `reading` and `phases` may be read from
    any thread (the metrics thread does)."""

    def __init__(
        self,
        job_id: str,
        window: int,
        *,
        run_id: str = "",
        on_reading: Callable[[str, Reading], None] | None = None,
        history_due: Callable[[str, Reading], bool] | None = None,
        stale_after: float = DEFAULTS.stale_after,
        paused: bool = False,
    ) -> None:
        """`run_id`: the run of the agent that opened the job (it resumes only its own run's
        state: checkpoint.py); `on_reading`: told (job_id, reading) at each merged step;
        `history_due`: with a store, which readings its history keeps (None: nothing persists);
        `stale_after`: seconds of silence after which an open stream's rank is stale; `paused`:
        the collector asked the job's agents to stop sampling."""
        self.job_id = job_id
        self.run_id = run_id
        self.ranks = Ranks(stale_after, paused)
        self.marks = Marks()
        self.pipeline = Pipeline(job_id, window, on_reading=on_reading, history_due=history_due)
        self.frames_received = 0
        self.frames_late = 0
        self.frames_duplicate = 0  # replayed frames already applied: acknowledged, not applied again
        self.dirty = False  # changed since its last checkpoint
        self.tables_dirty = False  # its layer or site tables changed since its last checkpoint
        self.ended_at: float | None = time.monotonic()  # when its last stream ended (None: one is open)
        self.owners: dict[int, str] = {}  # rank -> the identity that opened it (module docstring)
        self.top_step = -1  # the highest step applied, and since when (the step bound) ...
        self.top_at = time.monotonic()  # ... (a resumed run: since it resumed)

    # -- what the collector reads -------------------------------------------------------------------

    @property
    def reading(self) -> Reading | None:
        """The reading of the last merged step (None: none yet); replaced whole at each step."""
        return self.pipeline.reading

    @property
    def merged_step(self) -> int:
        """The last step merged (-1: none yet)."""
        return self.pipeline.merged_step

    @property
    def layers(self) -> Mapping[str, LayerInfo]:
        """The job's layers by name, as first declared."""
        return self.pipeline.declared.layers

    @property
    def sites(self) -> Mapping[str, SiteInfo]:
        """The job's activation sites by name, as first declared."""
        return self.pipeline.declared.sites

    @property
    def layer_names(self) -> list[str]:
        return list(self.pipeline.declared.layers)

    @property
    def site_names(self) -> list[str]:
        return list(self.pipeline.declared.sites)

    def phases(self) -> Phases | None:
        """The job's and its layers' phases and transitions (None: no step merged yet)."""
        return self.pipeline.phases()

    def findings(self) -> tuple[list[Finding], dict[str, int]] | None:
        """The findings that hold now and how many of each were raised (copies: the event loop
        changes the live ones); None before the first merged step."""
        findings = self.pipeline.findings
        if findings is None:
            return None
        return list(dict(findings.active).values()), dict(findings.totals)

    def liveness(self, now: float | None = None) -> Liveness:
        """The job's ranks now (see `Ranks.liveness`)."""
        return self.ranks.liveness(now)

    def durable(self, stream: Stream) -> int:
        """The highest seq of this rank's agent process that a committed checkpoint holds, up to
        the last frame `stream` sent."""
        return self.marks.durable_seq(stream)

    # -- what its streams do ------------------------------------------------------------------------

    def open(self, stream: Stream, tenant: str = "") -> None:
        """Add an agent of `tenant` (an identity: `_tenant` in server.py). Its ranks must be no
        other identity's (WireError `rank_owned`), its tables agree with those the job's
        streaming ranks bound (WireError); they bind with its first frame (`accept`)."""
        ranks = stream.ranks or (stream.rank,)
        for rank in ranks:
            owner = self.owners.get(rank, tenant)
            if owner != tenant:
                raise WireError(
                    "rank_owned",
                    f"job {self.job_id!r} run {self.run_id!r} rank {rank} belongs to another identity "
                    "(the token or certificate that opened it) until it finishes",
                )
        self.pipeline.declared.check(stream.layers, stream.bins)
        self.owners.update(dict.fromkeys(ranks, tenant))
        self.ranks.open(stream)
        self.ended_at = None

    def close(self, stream: Stream, clean: bool = True) -> None:
        """The stream ended: cleanly (the rank finished) or not (the rank is stale until it
        returns); the steps it held back merge. Once no stream is open and nothing waits, the
        ranks' tables are let go (a rank that comes back binds its own again)."""
        self.ranks.close(stream, clean)
        if clean:  # a finished rank is no identity's any more (unless another stream of it is open)
            open_ranks = {rank for s in self.ranks.streams.values() for rank in s.ranks or (s.rank,)}
            for rank in set(stream.ranks or (stream.rank,)) - open_ranks:
                self.owners.pop(rank, None)
        stream.layers, stream.sites = [], []  # the ended stream's copy: `Declared` keeps what is bound
        merged = self.pipeline.merged_step
        self.pipeline.merge_ready(self.ranks.streams)
        self.dirty |= self.pipeline.merged_step != merged
        if not self.ranks.streams:
            self.ended_at = time.monotonic()
            if not self.pipeline.pending:
                self.pipeline.release()
                self.dirty = self.tables_dirty = True  # a restarted collector binds nothing either

    def streaming(self, now: float | None = None) -> bool:
        """Whether a rank of the job streams: an open stream has sent a frame and is not stale."""
        live = self.liveness(now)
        return any(s.frames and not stale for s, stale in live.ranks.values())

    @property
    def open_streams(self) -> int:
        """Streams of the job that are open now (sent a hello, not ended)."""
        return len(self.ranks.streams)

    def set_paused(self, paused: bool, now: float | None = None) -> None:
        """Pause or resume the job's agents: paused ranks are not stale for their silence."""
        self.ranks.set_paused(paused, now)

    def accept(
        self,
        stream: Stream,
        sample: Sample,
        energy_ranks: int | None = None,
        ranks: tuple[int, ...] = (),
        stamp: float | None = None,
    ) -> bool:
        """Take one rank's sample, numbered `stream.last_seq` (0: unnumbered), or a node's (its
        energy averaging `energy_ranks` ranks, merging `ranks`); merge every step that became
        complete. False: a duplicate of a frame already applied (not applied again). The job's
        next checkpoint makes it durable. `stamp`: the frame's wall time as its agent sent it
        (None: the sample's). WireError, and nothing changed: a step beyond the bound
        (`step_jump`), tables that disagree with the job's."""
        now = time.monotonic()
        self._check_step(sample.step, now)
        if not stream.frames:  # its first: the stream's tables bind (WireError if others bound first)
            self._bind(stream)
        self.ranks.heard(stream, now, ranks)
        if not self.marks.admit(stream, sample.step, sample.wall_time if stamp is None else stamp):
            self.frames_duplicate += 1
            return False
        if sample.step > self.top_step:
            self.top_step, self.top_at = sample.step, now
        self.frames_received += 1
        stream.frames += 1
        stream.last_step = max(stream.last_step, sample.step)
        if not self.pipeline.take(stream.rank, sample, self.ranks.streams, energy_ranks):
            self.frames_late += 1
        self.dirty = True
        return True

    def _check_step(self, step: int, now: float) -> None:
        """WireError `step_jump` if `step` leaps beyond the bound (see the module docstring)."""
        top = max(self.top_step, self.pipeline.merged_step)
        if top < 0:
            return
        reach = top + STEP_AHEAD + int(STEP_RATE * (now - self.top_at))
        if step > reach:
            raise WireError(
                "step_jump",
                f"step {step} leaps beyond step {reach}: job {self.job_id!r} is at step {top}, and a frame "
                f"may run at most {STEP_AHEAD} steps ahead of it, plus {STEP_RATE} a second since",
            )

    def _bind(self, stream: Stream) -> None:
        """Bind the tables of a stream's first frame. WireError `table_changed` if they change its
        rank's while the job still holds that rank's samples (they merge with its old tables
        first; the agent's retry binds then), or if others bound first (`Declared.declare`)."""
        declared = self.pipeline.declared
        node = (stream.ranks, stream.spans) if stream.ranks else None
        if not declared.same(stream.rank, stream.layers, stream.sites, stream.bins, node) and any(
            stream.rank in parts for parts in self.pipeline.pending.values()
        ):
            raise WireError(
                "table_changed",
                f"rank {stream.rank}'s layer table changed while steps the job holds have its samples "
                "under its old one; they merge first, then a new stream may bind the new table",
            )
        rebound = declared.rebound
        if declared.declare(stream.rank, stream.layers, stream.sites, stream.bins, node):
            self.dirty = self.tables_dirty = True
        if declared.rebound != rebound:
            self.pipeline.restart()
            self.top_step = -1
        stream.layers, stream.sites = declared.by_rank[stream.rank]
