"""A job's way from its ranks' samples to readings, phases and findings: which steps merge when,
then `merge.JobMerge` -> `science.derive.Thermometer` -> `science.detect.PhaseDetector` ->
`science.findings.Findings`, and the history rows, events and findings that wait in memory for
the next checkpoint.

Each rank's hello declares its layer table (`Declared`). A step is merged once every rank the
job waits for has sent it: the connected ranks, and the ranks of its `world_size` that have not
connected yet (agents that find their collector by discovery connect up to an interval apart);
or, once all ranks have connected, when every connected rank has moved past it (a rank that
skipped it, or left). Waiting is bounded: beyond MAX_PENDING_STEPS steps the oldest is merged
with the ranks it has. A frame arriving for a step that was already merged is late and not
applied (the job counts it). So a rank that comes back (a worker restarted from a checkpoint,
its step counter replaying steps already merged) counts nothing twice.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace

import numpy as np

from thermoscope.science.derive import Reading, Thermometer
from thermoscope.science.detect import PhaseDetector
from thermoscope.science.findings import Finding, Findings
from thermoscope.science.stats import LayerInfo, Sample, SiteInfo
from thermoscope.wire.codec import WireError

from ..merge import JobMerge, Tables
from .store import Event
from .stream import Stream

#: Steps a job holds unmerged while waiting for slow ranks, before merging the oldest anyway.
MAX_PENDING_STEPS = 32
#: A job's events kept in memory for the web page (the store keeps them all).
RECENT_EVENTS = 200


class Declared:
    """What a job's ranks declared in their hellos and bound with their first frame: each rank's
    layer and site tables, the job's layers and sites by name (as first bound: a layer held by
    several ranks is one), and the histogram bins every rank uses.

    A hello only *proposes* its tables (`check`: they must agree with what is bound); they bind
    (`declare`) when its stream sends its first frame. So a stream that says hello and sends
    nothing (a squatter, or an agent that died at once) fixes nothing for the job's real ranks,
    and a job's settings belong to the ranks that stream. Ranks of a data-parallel job declare
    equal tables: they are kept once (`_interned`), not once per rank.

    A node aggregator's stream binds under its lowest rank, with the ranks it speaks for and its
    table's runs of shards (`nodes`): the job's merge takes its entries as runs.
    """

    def __init__(self) -> None:
        self.by_rank: Tables = {}
        self.nodes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # key -> (its ranks, spans)
        self.layers: dict[str, LayerInfo] = {}
        self.sites: dict[str, SiteInfo] = {}
        self.bins = 0
        self._interned: dict[int, list] = {}  # hash of a table -> the one list every equal table shares
        self.bound: set[str] = set()  # names of the layers in `by_rank`'s tables (`_bound`)
        self.rebound = 0  # times a layer's released edges, or the bins, were bound anew, different

    def check(self, layers: list[LayerInfo], bins: int) -> None:
        """Whether tables agree with what the job's ranks bound: the histogram bins, and the
        edges of every layer a rank's tables bind now (WireError `edges_mismatch` otherwise).
        Edges no rank binds any more (`release`) bind nothing."""
        if not self.by_rank:
            return
        if bins != self.bins:
            raise WireError("edges_mismatch", f"histogram_bins {bins}; this job's ranks use {self.bins}")
        known, bound = self.layers, self._bound()
        for layer in layers:
            held = known.get(layer.name) if layer.name in bound else None
            if held is not None and (held.hist_lo, held.hist_hi) != (layer.hist_lo, layer.hist_hi):
                raise WireError(
                    "edges_mismatch",
                    f"layer {layer.name!r}: histogram edges [{layer.hist_lo}, {layer.hist_hi}) differ from "
                    f"[{held.hist_lo}, {held.hist_hi}) bound by another rank",
                )

    def _bound(self) -> set[str]:
        """The names of the layers the ranks' tables bind now: kept as they bind, walked once
        after a restore (which sets `by_rank` alone)."""
        if self.by_rank and not self.bound:
            tables = {id(layers): layers for layers, _ in self.by_rank.values()}
            self.bound = {layer.name for layers in tables.values() for layer in layers}
        return self.bound

    def same(
        self,
        rank: int,
        layers: list[LayerInfo],
        sites: list[SiteInfo],
        bins: int,
        node: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> bool:
        """Whether these are the tables `rank` bound already."""
        return (
            self.by_rank.get(rank) == (layers, sites) and bins == self.bins and self.nodes.get(rank) == node
        )

    def _intern(self, table: list) -> list:
        """`table`, or an equal table some rank bound already (one list shared, not a copy each)."""
        key = hash(tuple(table))
        known = self._interned.get(key)
        if known is not None and known == table:
            return known
        self._interned[key] = table
        return table

    def declare(
        self,
        rank: int,
        layers: list[LayerInfo],
        sites: list[SiteInfo],
        bins: int,
        node: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> bool:
        """Bind a rank's tables (its stream's first frame), or a node's under its lowest rank
        (`node`: its ranks and its table's spans); they must agree with what is bound (`check`:
        WireError, and nothing bound). True: the job's tables changed. A layer no rank binds now
        takes this rank's edges; when they, or the bins, differ from those it had, `rebound`
        counts it (the job's readings start over: `Pipeline.restart`)."""
        if self.same(rank, layers, sites, bins, node):
            return False
        self.check(layers, bins)
        bound = self._bound()
        if (bins != self.bins and self.bins) or any(
            (old := self.layers.get(layer.name)) is not None
            and layer.name not in bound
            and (old.hist_lo, old.hist_hi) != (layer.hist_lo, layer.hist_hi)
            for layer in layers
        ):
            self.rebound += 1
        self.bins = bins
        self.by_rank[rank] = (self._intern(layers), self._intern(sites))
        if node is None:
            self.nodes.pop(rank, None)
        else:
            self.nodes[rank] = node
        if len(self._interned) > 2 * len(self.by_rank) + 4:  # tables no rank holds any more
            self._interned = {hash(tuple(t)): t for tables in self.by_rank.values() for t in tables}
        for layer in layers:
            if layer.name not in bound:
                self.layers[layer.name] = layer  # (an existing name keeps its place)
        bound.update(layer.name for layer in layers)
        for site in sites:
            self.sites.setdefault(site.name, site)
        return True

    def release(self) -> None:
        """Forget the ranks' tables (every stream of the job ended and its steps merged): a rank
        that streams again binds its tables anew, its edges and bins too; the job's layers and
        sites by name stay (with the edges they had, until a rank binds others)."""
        self.by_rank = {}
        self.nodes = {}
        self.bound = set()
        self._interned.clear()


@dataclass(frozen=True)
class Phases:
    """A job's phases at one moment, as /metrics and the demo show them."""

    job: str  # the job's phase
    layers: list[str]  # each layer's, in the detector's layer order
    transitions: dict[tuple[str, str], int]  # job-scope (from, to) -> times
    last_transition_time: float | None  # when the job's phase last changed (Unix s)


@dataclass
class Unsaved:
    """What a job's merged steps produced since its last checkpoint, for the next one to write."""

    history: list[Reading] = field(default_factory=list)  # the readings its history keeps
    events: list[Event] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # raised or cleared (a copy as it was then)


class Pipeline:
    """A job's pending steps, merged in order into readings and phases (see the module docstring)."""

    def __init__(
        self,
        job_id: str,
        window: int,
        *,
        on_reading: Callable[[str, Reading], None] | None = None,
        history_due: Callable[[str, Reading], bool] | None = None,
    ) -> None:
        """`window`: samples per temperature window; `on_reading`: told (job_id, reading) at each
        merged step; `history_due`: with a store, whether a reading goes into the job's history
        (`EventStore.due`); None: nothing persists, so nothing waits in `unsaved`."""
        self.job_id = job_id
        self.window = window
        self.on_reading = on_reading
        self.history_due = history_due
        self.declared = Declared()
        self.pending: dict[int, dict[int, Sample]] = {}  # step -> rank -> sample
        self.world = 0  # the largest world size the job's streams announced
        self.energy_ranks: dict[int, dict[int, int]] = {}  # step -> node -> ranks its energy averages
        self.merged_step = -1
        self.thermometer: Thermometer | None = None
        self.reading: Reading | None = None
        self.detector: PhaseDetector | None = None
        self.transitions: Counter[tuple[str, str]] = Counter()  # job-scope (from, to)
        self.last_transition_time: float | None = None
        # the last RECENT_EVENTS events, replaced whole (never mutated), so that the web page's
        # thread reads them without a lock, with or without a store
        self.recent_events: tuple[Event, ...] = ()
        self.findings: Findings | None = None
        self.unsaved = Unsaved()
        self._merge = JobMerge()  # a cache, not state

    def release(self) -> None:
        """Every stream of the job ended and its steps merged: let go of the ranks' tables and the
        merge plans made of them (a rank that streams again binds its tables anew)."""
        self.declared.release()
        self._merge = JobMerge()

    def restart(self) -> None:
        """The job's ranks bound other edges or bins than its earlier ranks had (whose tables were
        released: a different model under the same job and run, as a squatter's frame on the
        default run leaves): their readings cannot go on from the earlier ones, so its steps,
        temperatures and phases start over (its counters go on, and its findings: their rules read
        the layers' moments and sites, not the edges, and a finding that holds still holds)."""
        self.merged_step, self.world = -1, 0
        self.thermometer = self.reading = self.detector = None

    def phases(self) -> Phases | None:
        """The phases now (None: no step merged yet)."""
        detector = self.detector
        if detector is None:
            return None
        return Phases(
            detector.job_phase, detector.layer_phases(), dict(self.transitions), self.last_transition_time
        )

    def take(
        self, rank: int, sample: Sample, streams: Mapping[int, Stream], energy_ranks: int | None = None
    ) -> bool:
        """Hold a rank's sample (or a node's, by its lowest rank, whose energy averages
        `energy_ranks` ranks) for its step and merge every step now complete, given the job's
        open `streams`. False: its step was merged already (late, not applied)."""
        if sample.step <= self.merged_step:
            return False
        self.pending.setdefault(sample.step, {})[rank] = sample
        if energy_ranks is not None:
            self.energy_ranks.setdefault(sample.step, {})[rank] = energy_ranks
        self.merge_ready(streams)
        return True

    def merge_ready(self, streams: Mapping[int, Stream]) -> None:
        """Merge, in step order, each pending step that no open stream (nor an announced rank
        never connected) still owes, or that waited beyond MAX_PENDING_STEPS."""
        declared, nodes = self.declared.by_rank, self.declared.nodes
        # the world the job's streams announced, remembered after they closed: a rank that
        # finished before another connected (a short job, a slow start) does not make the
        # job's steps merge without that rank
        self.world = world = max([self.world, *(s.world_size for s in streams.values())])
        if nodes:  # a node's stream binds the ranks it speaks for
            seen = sum(len(nodes[rank][0]) if rank in nodes else 1 for rank in declared if rank < world)
        else:
            seen = sum(rank < world for rank in declared)
        unseen = seen < world  # an announced rank never connected
        horizon = min((s.last_step for s in streams.values()), default=math.inf)
        for step in sorted(self.pending):
            parts = self.pending[step]
            complete = not unseen and (streams.keys() <= parts.keys() or step < horizon)
            if not (complete or len(self.pending) > MAX_PENDING_STEPS):
                break
            del self.pending[step]
            weights = self.energy_ranks.pop(step, None)
            layers, sites = self.declared.layers, self.declared.sites
            bad = _nonfinite_rows(parts, declared)
            self._apply(self._merge.merge(step, parts, declared, layers, sites, nodes, weights), bad)

    def _apply(self, sample: Sample, nonfinite: Sequence[tuple[int, str, str]] = ()) -> None:
        layers, sites = self.declared.layers, self.declared.sites
        th = self.thermometer
        if th is not None and th.layer_names == tuple(layers) and len(sites) > len(th.site_names):
            with suppress(ValueError):  # sites joined the job's table (first applied later): it goes on
                th.grow_sites(list(sites.values()))
        if th is None or th.layer_names != tuple(layers) or th.site_names != tuple(sites):
            th = self.thermometer = Thermometer(
                list(layers.values()), list(sites.values()), window=self.window
            )
        self.reading = th.add(sample)  # its temperatures are derived when first read
        self.merged_step = sample.step
        if self.on_reading is not None:
            self.on_reading(self.job_id, self.reading)
        if self.history_due is not None and self.history_due(self.job_id, self.reading):
            self.unsaved.history.append(self.reading)
        self._detect(sample)
        self._find(sample, nonfinite)

    def _find(self, sample: Sample, nonfinite: Sequence[tuple[int, str, str]]) -> None:
        """Update the findings from the merged sample (after the phases: the flow is one-way);
        keep what was raised or cleared for the next checkpoint."""
        reading = self.reading
        if self.findings is None:
            self.findings = Findings()
        changed = self.findings.update(
            sample, reading.layer_names, reading.site_names, reading.site_function, nonfinite
        )
        if self.history_due is not None:
            self.unsaved.findings.extend(replace(f) for f in changed)

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
        if events:
            self.recent_events = (*self.recent_events, *events)[-RECENT_EVENTS:]
        if self.history_due is not None:
            self.unsaved.events.extend(events)


def _nonfinite_rows(parts: Mapping[int, Sample], tables: Tables) -> list[tuple[int, str, str]]:
    """(rank, "layer" or "site", name) of each row a part sent non-finite at this step: the
    wire NaN-s such a row (`codec.decode`) before anything merges it."""
    out = []
    for rank, part in parts.items():
        table = tables.get(rank)
        if table is None:
            continue
        layers, sites = table
        for i in np.flatnonzero(np.isnan(part.layers.mean) | np.isnan(part.layers.m2)):
            if i < len(layers):
                out.append((rank, "layer", layers[i].name))
        for i in np.flatnonzero(np.isnan(part.sites.in_mean) | np.isnan(part.sites.out_m2)):
            if i < len(sites):
                out.append((rank, "site", sites[i].name))
    return out
