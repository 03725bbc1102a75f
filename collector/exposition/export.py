"""The `/metrics` reader: at each scrape, a snapshot of every job (its latest reading, liveness and
phases, each read once), and each family of the catalogue (catalogue.py) read from it, in the
writer's text format (writer.py); `metrics_app` serves it.

Liveness is the one place ranks appear: `thermoscope_rank_stale{job_id,rank}` (one series
per rank that streams or is stale; a rank that finished has none), beside
`thermoscope_agents_connected{job_id}`, `thermoscope_rank_lost_total{job_id}` and
`thermoscope_job_paused{job_id}`. Its series are bounded by `max_series` too, since a rank is
whatever an agent's hello claims (2,000 were seen): a job with more ranks exports
`max_series - 1` of them, its stale ranks first (they are what the alerts read), then those
that stream, in rank order, and one `__other__` series that is 1 if any rank folded into it is
stale. A maximum rather than the sum, so that the 0/1 gauge stays one (the shipped
`ThermoscopeAgentsDisappeared` alert asks `max by (job_id) (...) == 1`); `sum by (job_id)`
counts the stale ranks exactly while fewer than `max_series` are.

Cardinality is bounded per job: a job with more layers (or sites) than `max_series` exports
its first `max_series - 1` and folds the rest into one `__other__` series per metric, counted
in `thermoscope_layers_folded{job_id}` / `thermoscope_sites_folded{job_id}`. Folding happens
here, at export, not at merge: the merged sample, the detector and the history keep every
layer (no reading is lost, only its series), and the additive readings fold exactly, the
entropies and the work being sums over layers (the `__other__` entropy is what the folded
layers add to `thermoscope_entropy_nats`). Ratios (temperatures, negentropy, outside share,
site efficiency) have no exact fold from the per-layer readings: `__other__` is NaN for them.
NaN/Inf values agents send are not merged; they are counted in
`thermoscope_nonfinite_values_total{job_id,what}`. `name[]` renders the named families alone.

The HTTP thread reads state the event loop mutates: it copies the job table once per scrape and
reads each job's `reading` (replaced whole per merged step, never mutated) once per job; the
snapshot only reads.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from thermoscope.science.derive import Reading
from thermoscope.science.detect import PHASES, TRANSITIONS
from thermoscope.science.findings import NAMES, Finding
from thermoscope.science.physics import QUANTILES

from ..settings import DEFAULTS
from ..state.job import Job, Liveness
from ..state.pipeline import Phases
from .catalogue import ADDITIVE, FAMILIES, JOB_GAUGES, LAYER_GAUGES, OTHER, SITE_GAUGE, SITE_SCALE_GAUGE
from .writer import CONTENT_TYPE, fill, header, label_set, rows, template, values

#: A scope's `thermoscope_phase` values (in `PHASES` order), by its current phase.
_ONE_HOT = {p: tuple(float(q == p) for q in PHASES) for p in PHASES}


def _kept(n: int, max_series: int) -> int:
    """How many of `n` layers (sites) keep a series of their own: the rest fold into `OTHER`."""
    return max_series - 1 if n > max_series else n


def _series(names: tuple[str, ...], keep: int) -> tuple[str, ...]:
    """The names of a job's layer (site) series: the first `keep`, then `OTHER` if any is left."""
    return names if keep == len(names) else (*names[:keep], OTHER)


def _fold(numbers: np.ndarray, keep: int, additive: bool) -> np.ndarray:
    """One job's values of a layer (site) family, those beyond `keep` folded into `OTHER`'s."""
    if keep == len(numbers):
        return numbers
    # a plain sum in layer order, as the series were summed before (not numpy's pairwise sum)
    other = float(sum(np.asarray(numbers[keep:], dtype=np.float64).tolist())) if additive else math.nan
    return np.append(np.asarray(numbers[:keep], dtype=np.float64), other)


class _JobLabels:
    """One job's label sets for one set of layer and site names, escaped once, as templates.

    Building label text was a third of a scrape's cost when done per sample; a job's names
    change only when a rank declares new layers or sites, so a scrape rebuilds this only then
    (`fits`). The templates leave the metric name out (`_fill` puts it in), so the seven layer
    families share one.
    """

    def __init__(self, job_id: str, reading: Reading | None, max_series: int, phase_layers: int) -> None:
        self.job_id = job_id
        self.layer_names = reading.layer_names if reading is not None else ()
        self.site_names = reading.site_names if reading is not None else ()
        self.job = label_set(("job_id", job_id))
        self.layer_keep = _kept(len(self.layer_names), max_series)
        self.site_keep = _kept(len(self.site_names), max_series)
        self.layers = template(
            label_set(("job_id", job_id), ("layer", name))
            for name in _series(self.layer_names, self.layer_keep)
        )
        self.sites = template(
            label_set(("job_id", job_id), ("site", name)) for name in _series(self.site_names, self.site_keep)
        )
        scopes = [("job", "")] + [("layer", name) for name in self.layer_names[:phase_layers]]
        self.phases = [  # one template per scope: the job, then its first layers
            template(
                label_set(("job_id", job_id), ("scope", scope), ("layer", layer), ("phase", phase))
                for phase in PHASES
            )
            for scope, layer in scopes
        ]
        self.transitions = template(
            label_set(("job_id", job_id), ("from", a), ("to", b)) for a, b in TRANSITIONS
        )

    def fits(self, reading: Reading | None) -> bool:
        """Whether these are still the labels of `reading`'s layers and sites."""
        layers = reading.layer_names if reading is not None else ()
        sites = reading.site_names if reading is not None else ()
        return (layers is self.layer_names or layers == self.layer_names) and (
            sites is self.site_names or sites == self.site_names
        )


class Snapshot:
    """One scrape's read-only view of the jobs: the job table copied once, each job's reading read
    once, its liveness and phases at most once (when a family asks)."""

    def __init__(self, jobs: list[tuple[Job, Reading | None, _JobLabels]]) -> None:
        self.jobs = jobs
        self.readings = [(reading, labels) for _, reading, labels in jobs if reading is not None]

    @functools.cached_property
    def liveness(self) -> list[tuple[Job, Liveness, _JobLabels]]:
        """Each job's liveness, taken once (under its lock) for the four liveness families."""
        return [(job, job.liveness(), labels) for job, _, labels in self.jobs]

    @functools.cached_property
    def findings(self) -> list[tuple[str, list[Finding], dict[str, int]]]:
        """Each job's findings that hold and its counts of each, taken once for both families
        (the jobs that merged a step)."""
        return [(job.job_id, *found) for job, _, _ in self.jobs if (found := job.findings()) is not None]

    @functools.cached_property
    def phases(self) -> list[tuple[Phases, _JobLabels]]:
        """The phases of each job that merged a step, taken once for the three phase families."""
        return [(phases, labels) for job, _, labels in self.jobs if (phases := job.phases()) is not None]


_Samples = Callable[[bytes, Snapshot], bytes]


class MetricsExporter:
    """The collector's `/metrics` body, rendered from its jobs and counters at each scrape."""

    def __init__(
        self,
        jobs: Mapping[str, Job],
        rejected: Mapping[str, int],
        version: str,
        phase_layers: int = DEFAULTS.phase_layers,
        *,
        max_series: int = DEFAULTS.max_series_per_job,
        nonfinite: Mapping[tuple[str, str], int] | None = None,
        extra: CollectorRegistry | None = None,
    ) -> None:
        """`extra`: prometheus_client collectors (the process metrics), rendered after ours by it."""
        if max_series < 2:
            raise ValueError(f"max_series must be at least 2, got {max_series}")
        self._jobs = jobs
        self._rejected = rejected
        self._version = version
        self._phase_layers = phase_layers
        self._max_series = max_series
        self._nonfinite = nonfinite if nonfinite is not None else {}
        self._extra = extra
        self._labels: dict[str, _JobLabels] = {}
        partial = functools.partial
        readers: dict[str, _Samples] = {
            "thermoscope_collector_info": self._collector_info,
            "thermoscope_agents_connected": partial(_per_live, lambda job, live: live.connected),
            "thermoscope_rank_stale": self._rank_stale,
            "thermoscope_rank_info": self._rank_info,
            "thermoscope_rank_lost_total": partial(_per_live, lambda job, live: live.lost_total),
            "thermoscope_job_paused": partial(_per_live, lambda job, live: live.paused),
            "thermoscope_run_info": _run_info,
            "thermoscope_frames_received_total": partial(_per_job, "frames_received"),
            "thermoscope_frames_duplicate_total": partial(_per_job, "frames_duplicate"),
            "thermoscope_frames_rejected_total": self._rejected_total,
            "thermoscope_nonfinite_values_total": self._nonfinite_total,
            **{name: partial(_job_gauge, attr) for name, attr, _ in JOB_GAUGES},
            **{name: partial(_per_series, "layer", attr) for name, attr, _ in LAYER_GAUGES},
            SITE_GAUGE[0]: partial(_per_series, "site", SITE_GAUGE[1]),
            SITE_SCALE_GAUGE[0]: partial(_per_series, "site", SITE_SCALE_GAUGE[1]),
            "thermoscope_site_efficiency_quantile_ratio": _efficiency_quantiles,
            "thermoscope_site_efficiency_extreme_ratio": _efficiency_extremes,
            "thermoscope_layers_folded": partial(_folded, "layer"),
            "thermoscope_sites_folded": partial(_folded, "site"),
            "thermoscope_engine_info": self._site_engines,
            "thermoscope_site_info": _site_info,
            "thermoscope_network_engine_info": _network_engine,
            "thermoscope_phase": self._phase,
            "thermoscope_phase_transitions_total": _transitions,
            "thermoscope_finding": self._finding,
            "thermoscope_findings_total": _findings_total,
            "thermoscope_last_transition_timestamp_seconds": _last_transition,
        }
        # the catalogue's order, each family with its reader (a family without one is a KeyError here)
        self._families = tuple((family, readers[family.name]) for family in FAMILIES)

    def render(self, names: Collection[str] | None = None) -> list[bytes]:
        """The text-format body, in chunks: every family, or only those in `names` (as exposed;
        like prometheus_client's `name[]`, it also leaves out a named family that has no sample).

        Chunks, because joining them copies the whole body into fresh memory (20 ms for 30 MB
        on this project's machine), which the server does not need: it writes them in turn."""
        snapshot = self._snapshot()
        out = []
        for family, samples in self._families:
            if names is not None and family.name not in names:
                continue
            text = samples(family.name.encode(), snapshot)
            if text or names is None:
                out += (header(family), text)
        if self._extra is not None:
            out.append(
                generate_latest(self._extra if names is None else self._extra.restricted_registry(names))
            )
        return out

    def _snapshot(self) -> Snapshot:
        cache, labels, jobs = self._labels, {}, []
        for job in list(self._jobs.values()):  # one atomic copy: the event loop may add jobs meanwhile
            reading = job.reading  # read once: the event loop replaces it at each merged step
            entry = cache.get(job.job_id)
            if entry is None or not entry.fits(reading):
                entry = _JobLabels(job.job_id, reading, self._max_series, self._phase_layers)
            labels[job.job_id] = entry
            jobs.append((job, reading, entry))
        self._labels = labels  # concurrent scrapes may each build an entry: either one is right
        return Snapshot(jobs)

    def _collector_info(self, name: bytes, view: Snapshot) -> bytes:
        return rows(name, [(label_set(("version", self._version)), 1.0)])

    def _rejected_total(self, name: bytes, view: Snapshot) -> bytes:
        return rows(name, [(label_set(("reason", r)), n) for r, n in sorted(dict(self._rejected).items())])

    def _nonfinite_total(self, name: bytes, view: Snapshot) -> bytes:
        counts = sorted(dict(self._nonfinite).items())
        return rows(
            name, [(label_set(("job_id", job_id), ("what", what)), n) for (job_id, what), n in counts]
        )

    def _site_engines(self, name: bytes, view: Snapshot) -> bytes:
        return rows(
            name,
            [
                (
                    label_set(
                        ("job_id", labels.job_id),
                        ("site", site),
                        ("engine", str(engine)),
                        ("function", function),
                    ),
                    1.0,
                )
                for r, labels in view.readings
                for site, engine, function in zip(
                    r.site_names[: self._max_series], r.site_engine, r.site_function, strict=False
                )
                if engine
            ],
        )

    def _rank_stale(self, name: bytes, view: Snapshot) -> bytes:
        return rows(
            name,
            [
                (label_set(("job_id", job.job_id), ("rank", rank)), float(is_stale))
                for job, live, _ in view.liveness
                for rank, is_stale in _stale_ranks(live, self._max_series)
            ],
        )

    def _rank_info(self, name: bytes, view: Snapshot) -> bytes:
        """The placement of each rank `thermoscope_rank_stale` names (a folded rank has none: its
        `__other__` runs nowhere in particular)."""
        out = []
        for job, live, _ in view.liveness:
            for rank, _ in _stale_ranks(live, self._max_series):
                if rank != OTHER:
                    s = live.ranks[int(rank)][0]
                    labels = (("job_id", job.job_id), ("rank", rank), ("host", s.host), ("pod", s.pod))
                    out.append((label_set(*labels, ("gpu", s.gpu)), 1.0))
        return rows(name, out)

    def _finding(self, name: bytes, view: Snapshot) -> bytes:
        """1 per finding that holds, by its layer or site; of one finding's, the first
        `max_series - 1` (by the step raised) keep their own series, the rest share `OTHER`."""
        out = []
        for job_id, active, _ in view.findings:
            by_name: dict[str, list[str]] = {}
            for f in sorted(active, key=lambda f: (f.step, f.layer)):
                names = by_name.setdefault(f.finding, [])
                if f.layer not in names:
                    names.append(f.layer)
            for finding, names in sorted(by_name.items()):
                keep = _kept(len(names), self._max_series)
                out += [
                    (label_set(("job_id", job_id), ("finding", finding), ("layer", layer)), 1.0)
                    for layer in _series(tuple(names), keep)
                ]
        return rows(name, out)

    def _phase(self, name: bytes, view: Snapshot) -> bytes:
        """State-sets of the job's and its first `phase_layers` layers' phases."""
        out = []
        for job_phases, labels in view.phases:
            phases = [job_phases.job, *job_phases.layers[: self._phase_layers]]
            n = min(len(phases), len(labels.phases))  # the layers both the detector and reading have
            one_hot = list(itertools.chain.from_iterable(map(_ONE_HOT.__getitem__, phases[:n])))
            out.append(fill(name, b"".join(labels.phases[:n]), one_hot))
        return b"".join(out)


def _findings_total(name: bytes, view: Snapshot) -> bytes:
    return rows(
        name,
        [
            (label_set(("job_id", job_id), ("finding", finding)), totals.get(finding, 0))
            for job_id, _, totals in view.findings
            for finding in NAMES  # every one from the job's first step, at 0: increase() sees the first
        ],
    )


def _per_job(attr: str, name: bytes, view: Snapshot) -> bytes:
    return rows(name, [(labels.job, getattr(job, attr)) for job, _, labels in view.jobs])


def _run_info(name: bytes, view: Snapshot) -> bytes:
    """The run each job shows, where its agents named one (a Ray Train run's name: what users
    know a Ray job by, whose id is opaque)."""
    named = [job for job, _, _ in view.jobs if job.run_id]
    return rows(name, [(label_set(("job_id", job.job_id), ("run", job.run_id)), 1.0) for job in named])


def _per_live(value: Callable[[Job, Liveness], float], name: bytes, view: Snapshot) -> bytes:
    return rows(name, [(labels.job, value(job, live)) for job, live, labels in view.liveness])


def _stale_ranks(live: Liveness, max_series: int) -> list[tuple[str, bool]]:
    """(rank label, stale) of a job's `thermoscope_rank_stale` series: every rank, or beyond
    `max_series` the stale ones first, then those streaming, and `OTHER` for the rest."""
    stale = {rank: is_stale for rank, (_, is_stale) in live.ranks.items()}
    if len(stale) <= max_series:
        return [(str(rank), is_stale) for rank, is_stale in stale.items()]
    ranked = sorted(stale, key=lambda rank: (not stale[rank], rank))
    kept, folded = sorted(ranked[: max_series - 1]), ranked[max_series - 1 :]
    return [(str(rank), stale[rank]) for rank in kept] + [(OTHER, any(stale[rank] for rank in folded))]


def _job_gauge(attr: str, name: bytes, view: Snapshot) -> bytes:
    return rows(name, [(labels.job, getattr(reading, attr)) for reading, labels in view.readings])


def _per_series(which: str, attr: str, name: bytes, view: Snapshot) -> bytes:
    """A per-layer (`which="layer"`) or per-site family, from each job's cached template."""
    additive = attr in ADDITIVE
    return b"".join(
        fill(
            name,
            getattr(labels, f"{which}s"),
            values(_fold(getattr(reading, attr), getattr(labels, f"{which}_keep"), additive)),
        )
        for reading, labels in view.readings
    )


def _folded(which: str, name: bytes, view: Snapshot) -> bytes:
    return rows(
        name,
        [
            (labels.job, len(getattr(labels, f"{which}_names")) - getattr(labels, f"{which}_keep"))
            for _, labels in view.readings
        ],
    )


def _efficiency_quantiles(name: bytes, view: Snapshot) -> bytes:
    """Each job's site efficiencies at `physics.QUANTILES`, from the whole reading (not folded)."""
    return rows(
        name,
        [
            (label_set(("job_id", labels.job_id), ("q", f"{q:g}")), value)
            for reading, labels in view.readings
            if len(reading.site_names)
            for q, value in zip(QUANTILES, reading.efficiency_quantiles, strict=True)
        ],
    )


def _efficiency_extremes(name: bytes, view: Snapshot) -> bytes:
    """Each job's lowest and highest site efficiency, labelled by its site."""
    out = []
    for reading, labels in view.readings:
        low, high = reading.efficiency_extremes
        if low:
            lowest, *_, highest = reading.efficiency_quantiles
            out += [
                (label_set(("job_id", labels.job_id), ("extreme", "min"), ("site", low)), lowest),
                (label_set(("job_id", labels.job_id), ("extreme", "max"), ("site", high)), highest),
            ]
    return rows(name, out)


def _site_info(name: bytes, view: Snapshot) -> bytes:
    """What each site with a series of its own applies (a folded site has none: `__other__`
    applies no one function), its kind from the job's site table as the agents declared it."""
    out = []
    for job, reading, labels in view.jobs:
        if reading is None:
            continue
        declared = dict(job.pipeline.declared.sites)  # one copy: the event loop may add sites
        for site, function in zip(labels.site_names[: labels.site_keep], reading.site_function, strict=False):
            kind = info.kind if (info := declared.get(site)) is not None else ""
            out.append(
                (
                    label_set(("job_id", job.job_id), ("site", site), ("function", function), ("kind", kind)),
                    1.0,
                )
            )
    return rows(name, out)


def _network_engine(name: bytes, view: Snapshot) -> bytes:
    return rows(
        name,
        [
            (label_set(("job_id", labels.job_id), ("engine", reading.engine)), 1.0)
            for reading, labels in view.readings
            if reading.engine
        ],
    )


def _transitions(name: bytes, view: Snapshot) -> bytes:
    return b"".join(
        fill(name, labels.transitions, values([phases.transitions.get(t, 0) for t in TRANSITIONS]))
        for phases, labels in view.phases
    )


def _last_transition(name: bytes, view: Snapshot) -> bytes:
    return rows(
        name,
        [(labels.job, t) for phases, labels in view.phases if (t := phases.last_transition_time) is not None],
    )


def metrics_app(exporter: MetricsExporter) -> Callable[..., list[bytes]]:
    """A WSGI app serving `exporter`'s body at any path, as prometheus_client's app does: GET
    only; `name[]` query parameters restrict the body to the families named.

    Always text format 0.0.4 (`CONTENT_TYPE`), which Prometheus takes even when it asks for
    OpenMetrics first; and never compressed, although Prometheus asks for gzip, because the
    collector's one core is what is scarce, not the network. At 250 jobs x 200 layers
    (tests/bench/bench_scrape.py, this project's machine) rendering the 33.5 MiB body costs
    ~200 ms; gzip level 1 would add ~105 ms (to 3.9 MiB), level 9, what prometheus_client's
    handler does, ~1.4 s (to 3.5 MiB). Uncompressed, a scrape every 15 s is ~18 Mbit/s, which a
    cluster network carries without noticing.
    """

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["REQUEST_METHOD"] != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET"), ("Content-Type", "text/plain")])
            return [b"405 Method Not Allowed: use GET\n"]
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        chunks = exporter.render(frozenset(names) if names else None)
        start_response(
            "200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(sum(map(len, chunks))))]
        )
        return chunks

    return app
