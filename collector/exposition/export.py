"""Prometheus exposition: the `/metrics` body, rendered from the jobs' latest readings at each scrape.

Metric names and labels are a contract (dashboards and alert rules depend on them):
base units, `_total` counters, the job label is `job_id` (Prometheus owns `job` and
`instance`), and no per-layer series carries a `rank` label: ranks are merged first, so a
job's series count is layers + sites, whatever its world size. NaN means undefined (a
temperature whose entropy or energy change is not significant over the window; its standard
error is NaN there too).

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
`thermoscope_nonfinite_values_total{job_id,what}`.

Rendering. The body is written here, in text format 0.0.4, not through prometheus_client's
per-sample objects: at 250 jobs x 200 layers (1,000 agents in jobs of 4 ranks) it holds about
420,000 samples, and building a `Metric` and a `Sample` per series, then formatting each one in
Python, took 1.7-2.8 s per scrape on the HTTP thread, holding the GIL while the gRPC event loop
waited. Here each job's label sets are escaped once into a byte template (`_JobLabels`: one
`%s{labels} %a` line per series, rebuilt only when the job's layer or site names change), and a
family's lines for one job are one C-level `%` of that template with the metric name and the
values (floats' reprs; NaN, +Inf and -Inf as Prometheus spells them): the reprs are most of
what is left. The samples are those prometheus_client wrote: the same names, label sets (labels
sorted by name), HELP, TYPE, family order and values; only the spelling of positive values
>= 1e6 differs (its `floatToGoString` writes 1.5e+06, here 1500000.0: the same float). `name[]`
renders the named families alone. The cost: tests/bench/bench_scrape.py, docs/benchmarks.md.

The HTTP thread reads state the event loop mutates: it copies the job table once per scrape and
reads each job's `reading` (replaced whole per merged step, never mutated) once per job.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from thermoscope.science.derive import Reading
from thermoscope.science.detect import PHASES, TRANSITIONS
from thermoscope.science.physics import CONFIDENCE

from ..settings import DEFAULTS
from ..state.job import Job, Liveness
from ..state.pipeline import Phases

#: The series the layers (sites) of a job beyond `max_series` are folded into.
OTHER = "__other__"
#: Layer readings that are sums over values, so a sum over layers folds them exactly.
ADDITIVE = frozenset({"layer_entropy", "layer_histogram_entropy", "layer_work"})

JOB_GAUGES: tuple[tuple[str, str, str], ...] = (
    (
        "thermoscope_energy",
        "energy",
        "Training loss at the last merged step, mean over ranks (loss units): handed to the agent, or "
        "captured from backward(); where no loss is seen, the cumulative work since the job's first "
        "sample (thermoscope_energy_from_work says which).",
    ),
    (
        "thermoscope_energy_from_work",
        "energy_from_work",
        "1 where the job's energy is the cumulative work since its first sample (no loss was handed "
        "over nor captured from backward()), 0 where it is the training loss.",
    ),
    ("thermoscope_entropy_nats", "entropy", "Parameter entropy of the job, sum over layers (nats)."),
    (
        "thermoscope_temperature",
        "temperature",
        "Job temperature dE/dS over the window (loss units per nat); NaN: undefined, the entropy's "
        f"or the energy's slope not significant at {CONFIDENCE:.0%} (t-test on the window's scatter).",
    ),
    (
        "thermoscope_temperature_stderr",
        "temperature_stderr",
        "Standard error of the job temperature from the window's scatter, delta method "
        "(loss units per nat); NaN where the temperature is undefined.",
    ),
    (
        "thermoscope_inverse_temperature",
        "beta",
        "Job inverse temperature dS/dE over the window (nats per loss unit).",
    ),
    (
        "thermoscope_efficiency_ratio",
        "efficiency",
        "Network work efficiency 1 - prod(1 - eta) over activation sites.",
    ),
    ("thermoscope_last_step", "step", "Last optimizer step merged for the job."),
)
LAYER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("thermoscope_layer_entropy_nats", "layer_entropy", "Layer entropy n * h, gaussian estimator (nats)."),
    (
        "thermoscope_layer_temperature",
        "layer_temperature",
        "Layer temperature dE/dS over the window (loss units per nat); NaN: undefined, the layer's "
        f"entropy or work change not significant at {CONFIDENCE:.0%} (t-test on the window's increments).",
    ),
    (
        "thermoscope_layer_inverse_temperature",
        "layer_beta",
        "Layer inverse temperature dS/dE over the window (nats per loss unit).",
    ),
    (
        "thermoscope_layer_binned_entropy_nats",
        "layer_histogram_entropy",
        "Layer entropy n * h from its histogram on fixed edges over a fixed subset (nats).",
    ),
    (
        "thermoscope_layer_negentropy_nats",
        "layer_negentropy",
        "Non-Gaussianity h_gauss - h_hist of the layer's values (nats per value; 0 for a Gaussian shape).",
    ),
    (
        "thermoscope_layer_outside_edges_ratio",
        "layer_outside",
        "Share of the layer's histogram subset outside its fixed edges (not in the histogram entropy).",
    ),
    (
        "thermoscope_layer_work",
        "layer_work",
        "Work <g, theta_after - theta_before> of the last sampled update on the layer (loss units).",
    ),
    (
        "thermoscope_layer_temperature_stderr",
        "layer_temperature_stderr",
        "Standard error of the layer temperature from the scatter of the window's increments, "
        "delta method (loss units per nat); NaN where the temperature is undefined.",
    ),
)

#: What `metrics_app` serves.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SITE_GAUGE = (
    "thermoscope_site_efficiency_ratio",
    "site_efficiency",
    "Work efficiency 1 - Var(a)/Var(z) of the activation site.",
)
#: A scope's `thermoscope_phase` values (in `PHASES` order), by its current phase.
_ONE_HOT = {p: tuple(float(q == p) for q in PHASES) for p in PHASES}


class _Verbatim:
    """A sample value that `%a` writes as is (a float's repr says nan, inf, -inf)."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


_NAN, _POS_INF, _NEG_INF = _Verbatim("NaN"), _Verbatim("+Inf"), _Verbatim("-Inf")


def escape(value: str) -> str:
    """A label value as prometheus_client escapes it: backslash, newline, double quote."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_set(*pairs: tuple[str, str]) -> bytes:
    """`{name="value",...}`, names sorted as prometheus_client sorts them, `%` doubled for `_fill`."""
    text = "{" + ",".join(f'{k}="{escape(v)}"' for k, v in sorted(pairs)) + "}"
    return text.encode().replace(b"%", b"%%")


def _template(label_sets: Iterable[bytes]) -> bytes:
    """One `%s{labels} %a` line per label set, for `_fill` to put a family's name and values in."""
    return b"".join(b"%s" + labels + b" %a\n" for labels in label_sets)


def _values(values: Any) -> list[float | _Verbatim]:
    """Sample values for `_fill`: floats, whose repr Go parses, or NaN, +Inf, -Inf as spelled
    in the text format."""
    array = np.asarray(values, dtype=np.float64)
    out: list[float | _Verbatim] = array.tolist()
    for i in np.flatnonzero(~np.isfinite(array)).tolist():
        out[i] = _NAN if math.isnan(array[i]) else _POS_INF if array[i] > 0 else _NEG_INF
    return out


def _fill(name: bytes, template: bytes, values: list[float | _Verbatim]) -> bytes:
    """The lines of `template` with the family's name and `values` in them: one C-level `%`,
    of which the floats' reprs are most of what a large scrape costs."""
    args: list[Any] = [name] * (2 * len(values))
    args[1::2] = values
    return template % tuple(args)


def _rows(name: bytes, rows: list[tuple[bytes, float]]) -> bytes:
    """A few samples, (label set, value) each, their template built on the spot."""
    return _fill(name, _template(labels for labels, _ in rows), _values([value for _, value in rows]))


def _kept(n: int, max_series: int) -> int:
    """How many of `n` layers (sites) keep a series of their own: the rest fold into `OTHER`."""
    return max_series - 1 if n > max_series else n


def _series(names: tuple[str, ...], keep: int) -> tuple[str, ...]:
    """The names of a job's layer (site) series: the first `keep`, then `OTHER` if any is left."""
    return names if keep == len(names) else (*names[:keep], OTHER)


def _fold(values: np.ndarray, keep: int, additive: bool) -> np.ndarray:
    """One job's values of a layer (site) family, those beyond `keep` folded into `OTHER`'s."""
    if keep == len(values):
        return values
    # a plain sum in layer order, as the series were summed before (not numpy's pairwise sum)
    other = float(sum(np.asarray(values[keep:], dtype=np.float64).tolist())) if additive else math.nan
    return np.append(np.asarray(values[:keep], dtype=np.float64), other)


@dataclass(frozen=True)
class _Family:
    """A family as exposed: `name` is its samples' name (with `_total`, `_info`)."""

    name: str
    type: str
    help: str

    @property
    def header(self) -> bytes:
        text = self.help.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {self.name} {text}\n# TYPE {self.name} {self.type}\n".encode()


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
        self.job = _label_set(("job_id", job_id))
        self.layer_keep = _kept(len(self.layer_names), max_series)
        self.site_keep = _kept(len(self.site_names), max_series)
        self.layers = _template(
            _label_set(("job_id", job_id), ("layer", name))
            for name in _series(self.layer_names, self.layer_keep)
        )
        self.sites = _template(
            _label_set(("job_id", job_id), ("site", name))
            for name in _series(self.site_names, self.site_keep)
        )
        scopes = [("job", "")] + [("layer", name) for name in self.layer_names[:phase_layers]]
        self.phases = [  # one template per scope: the job, then its first layers
            _template(
                _label_set(("job_id", job_id), ("scope", scope), ("layer", layer), ("phase", phase))
                for phase in PHASES
            )
            for scope, layer in scopes
        ]
        self.transitions = _template(
            _label_set(("job_id", job_id), ("from", a), ("to", b)) for a, b in TRANSITIONS
        )

    def fits(self, reading: Reading | None) -> bool:
        """Whether these are still the labels of `reading`'s layers and sites."""
        layers = reading.layer_names if reading is not None else ()
        sites = reading.site_names if reading is not None else ()
        return (layers is self.layer_names or layers == self.layer_names) and (
            sites is self.site_names or sites == self.site_names
        )


class _View:
    """One scrape's view of the jobs: the job table copied once, each job's reading read once."""

    def __init__(self, jobs: list[tuple[Job, Reading | None, _JobLabels]]) -> None:
        self.jobs = jobs
        self.readings = [(reading, labels) for _, reading, labels in jobs if reading is not None]

    @functools.cached_property
    def liveness(self) -> list[tuple[Job, Liveness, _JobLabels]]:
        """Each job's liveness, taken once (under its lock) for the four liveness families."""
        return [(job, job.liveness(), labels) for job, _, labels in self.jobs]

    @functools.cached_property
    def phases(self) -> list[tuple[Phases, _JobLabels]]:
        """The phases of each job that merged a step, taken once for the three phase families."""
        return [(phases, labels) for job, _, labels in self.jobs if (phases := job.phases()) is not None]


_Samples = Callable[[bytes, _View], bytes]


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
        families: list[tuple[str, str, str, _Samples]] = [
            ("thermoscope_collector_info", "gauge", "The Thermoscope collector.", self._collector_info),
            (
                "thermoscope_agents_connected",
                "gauge",
                "Agents streaming for the job: open streams whose rank is not stale.",
                partial(_per_live, lambda job, live: live.connected),
            ),
            (
                "thermoscope_rank_stale",
                "gauge",
                "1 if the rank is stale: its stream ended abnormally, or sent nothing for the collector's "
                "stale_after seconds while the job was not paused; 0 if it streams. A rank that "
                "finished (closed its stream cleanly) has no series.",
                self._rank_stale,
            ),
            (
                "thermoscope_rank_lost_total",
                "counter",
                "Times a rank of the job went stale (a rank that reconnects is live again).",
                partial(_per_live, lambda job, live: live.lost_total),
            ),
            (
                "thermoscope_job_paused",
                "gauge",
                "1 if the collector asked the job's agents to stop sampling (detached), else 0.",
                partial(_per_live, lambda job, live: live.paused),
            ),
            (
                "thermoscope_frames_received_total",
                "counter",
                "Frames accepted for the job.",
                partial(_per_job, "frames_received"),
            ),
            (
                "thermoscope_frames_duplicate_total",
                "counter",
                "Frames replayed after a reconnect that the job had already applied: "
                "acknowledged, not applied.",
                partial(_per_job, "frames_duplicate"),
            ),
            (
                "thermoscope_frames_rejected_total",
                "counter",
                "Messages refused, by reason.",
                self._rejected_total,
            ),
            (
                "thermoscope_nonfinite_values_total",
                "counter",
                "NaN/Inf values agents sent, by what carried them (energy, wall_time, layer, site): "
                "counted, never merged (the layer or site is NaN at that step).",
                self._nonfinite_total,
            ),
            *((name, "gauge", doc, partial(_job_gauge, attr)) for name, attr, doc in JOB_GAUGES),
            *((name, "gauge", doc, partial(_per_series, "layer", attr)) for name, attr, doc in LAYER_GAUGES),
            (SITE_GAUGE[0], "gauge", SITE_GAUGE[2], partial(_per_series, "site", SITE_GAUGE[1])),
            (
                "thermoscope_layers_folded",
                "gauge",
                "Layers of the job exported only inside its __other__ layer series (the collector's "
                "max_series_per_job bound on cardinality).",
                partial(_folded, "layer"),
            ),
            (
                "thermoscope_sites_folded",
                "gauge",
                "Activation sites of the job exported only inside its __other__ site series.",
                partial(_folded, "site"),
            ),
            (
                "thermoscope_engine_info",
                "gauge",
                "Engine type of the activation site by its scale probe: "
                "A scale-invariant, B temperature-dependent.",
                self._site_engines,
            ),
            (
                "thermoscope_network_engine_info",
                "gauge",
                "Engine type of the network: A when all its sites are.",
                _network_engine,
            ),
            (
                "thermoscope_phase",
                "gauge",
                "Current phase (1) among type_i, transition, type_ii, refresh, unstable, for the job"
                ' (scope="job") and its first layers (scope="layer").',
                self._phase,
            ),
            (
                "thermoscope_phase_transitions_total",
                "counter",
                "Job-level phase transitions, by kind.",
                _transitions,
            ),
            (
                "thermoscope_last_transition_timestamp_seconds",
                "gauge",
                "When the job's last phase transition happened (Unix time).",
                _last_transition,
            ),
        ]
        self._families = tuple((_Family(name, kind, doc), samples) for name, kind, doc, samples in families)

    def render(self, names: Collection[str] | None = None) -> list[bytes]:
        """The text-format body, in chunks: every family, or only those in `names` (as exposed;
        like prometheus_client's `name[]`, it also leaves out a named family that has no sample).

        Chunks, because joining them copies the whole body into fresh memory (20 ms for 30 MB
        on this project's machine), which the server does not need: it writes them in turn."""
        view = self._view()
        out = []
        for family, samples in self._families:
            if names is not None and family.name not in names:
                continue
            text = samples(family.name.encode(), view)
            if text or names is None:
                out += (family.header, text)
        if self._extra is not None:
            out.append(
                generate_latest(self._extra if names is None else self._extra.restricted_registry(names))
            )
        return out

    def _view(self) -> _View:
        cache, labels, jobs = self._labels, {}, []
        for job in list(self._jobs.values()):  # one atomic copy: the event loop may add jobs meanwhile
            reading = job.reading  # read once: the event loop replaces it at each merged step
            entry = cache.get(job.job_id)
            if entry is None or not entry.fits(reading):
                entry = _JobLabels(job.job_id, reading, self._max_series, self._phase_layers)
            labels[job.job_id] = entry
            jobs.append((job, reading, entry))
        self._labels = labels  # concurrent scrapes may each build an entry: either one is right
        return _View(jobs)

    def _collector_info(self, name: bytes, view: _View) -> bytes:
        return _rows(name, [(_label_set(("version", self._version)), 1.0)])

    def _rejected_total(self, name: bytes, view: _View) -> bytes:
        return _rows(name, [(_label_set(("reason", r)), n) for r, n in sorted(dict(self._rejected).items())])

    def _nonfinite_total(self, name: bytes, view: _View) -> bytes:
        counts = sorted(dict(self._nonfinite).items())
        return _rows(
            name, [(_label_set(("job_id", job_id), ("what", what)), n) for (job_id, what), n in counts]
        )

    def _site_engines(self, name: bytes, view: _View) -> bytes:
        return _rows(
            name,
            [
                (_label_set(("job_id", labels.job_id), ("site", site), ("engine", str(engine))), 1.0)
                for r, labels in view.readings
                for site, engine in zip(r.site_names[: self._max_series], r.site_engine, strict=False)
                if engine
            ],
        )

    def _rank_stale(self, name: bytes, view: _View) -> bytes:
        return _rows(
            name,
            [
                (_label_set(("job_id", job.job_id), ("rank", rank)), float(is_stale))
                for job, live, _ in view.liveness
                for rank, is_stale in _stale_ranks(live, self._max_series)
            ],
        )

    def _phase(self, name: bytes, view: _View) -> bytes:
        """State-sets of the job's and its first `phase_layers` layers' phases."""
        out = []
        for job_phases, labels in view.phases:
            phases = [job_phases.job, *job_phases.layers[: self._phase_layers]]
            n = min(len(phases), len(labels.phases))  # the layers both the detector and reading have
            values = list(itertools.chain.from_iterable(map(_ONE_HOT.__getitem__, phases[:n])))
            out.append(_fill(name, b"".join(labels.phases[:n]), values))
        return b"".join(out)


def _per_job(attr: str, name: bytes, view: _View) -> bytes:
    return _rows(name, [(labels.job, getattr(job, attr)) for job, _, labels in view.jobs])


def _per_live(value: Callable[[Job, Liveness], float], name: bytes, view: _View) -> bytes:
    return _rows(name, [(labels.job, value(job, live)) for job, live, labels in view.liveness])


def _stale_ranks(live: Liveness, max_series: int) -> list[tuple[str, bool]]:
    """(rank label, stale) of a job's `thermoscope_rank_stale` series: every rank, or beyond
    `max_series` the stale ones first, then those streaming, and `OTHER` for the rest."""
    stale = {rank: is_stale for rank, (_, is_stale) in live.ranks.items()}
    if len(stale) <= max_series:
        return [(str(rank), is_stale) for rank, is_stale in stale.items()]
    ranked = sorted(stale, key=lambda rank: (not stale[rank], rank))
    kept, folded = sorted(ranked[: max_series - 1]), ranked[max_series - 1 :]
    return [(str(rank), stale[rank]) for rank in kept] + [(OTHER, any(stale[rank] for rank in folded))]


def _job_gauge(attr: str, name: bytes, view: _View) -> bytes:
    return _rows(name, [(labels.job, getattr(reading, attr)) for reading, labels in view.readings])


def _per_series(which: str, attr: str, name: bytes, view: _View) -> bytes:
    """A per-layer (`which="layer"`) or per-site family, from each job's cached template."""
    additive = attr in ADDITIVE
    return b"".join(
        _fill(
            name,
            getattr(labels, f"{which}s"),
            _values(_fold(getattr(reading, attr), getattr(labels, f"{which}_keep"), additive)),
        )
        for reading, labels in view.readings
    )


def _folded(which: str, name: bytes, view: _View) -> bytes:
    return _rows(
        name,
        [
            (labels.job, len(getattr(labels, f"{which}_names")) - getattr(labels, f"{which}_keep"))
            for _, labels in view.readings
        ],
    )


def _network_engine(name: bytes, view: _View) -> bytes:
    return _rows(
        name,
        [
            (_label_set(("job_id", labels.job_id), ("engine", reading.engine)), 1.0)
            for reading, labels in view.readings
            if reading.engine
        ],
    )


def _transitions(name: bytes, view: _View) -> bytes:
    return b"".join(
        _fill(name, labels.transitions, _values([phases.transitions.get(t, 0) for t in TRANSITIONS]))
        for phases, labels in view.phases
    )


def _last_transition(name: bytes, view: _View) -> bytes:
    return _rows(
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
