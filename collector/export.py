"""Prometheus exposition: one custom collector that reads the jobs' latest readings at scrape time.

Metric names and labels are a contract (dashboards and alert rules depend on them):
base units, `_total` counters, the job label is `job_id` (Prometheus owns `job` and
`instance`), and no per-layer series carries a `rank` label: ranks are merged first, so a
job's series count is layers + sites, whatever its world size. NaN means undefined (a
temperature whose changes are below their noise floor).

Liveness is the one place ranks appear: `thermoscope_rank_stale{job_id,rank}` (one series
per rank that streams or is stale; a rank that finished has none), beside
`thermoscope_agents_connected{job_id}`, `thermoscope_rank_lost_total{job_id}` and
`thermoscope_job_paused{job_id}`.

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from .detect import PHASES, TRANSITIONS
from .merge import Job

#: The series the layers (sites) of a job beyond `max_series` are folded into.
OTHER = "__other__"
#: Layer readings that are sums over values, so a sum over layers folds them exactly.
ADDITIVE = frozenset({"layer_entropy", "layer_histogram_entropy", "layer_work"})

JOB_GAUGES: tuple[tuple[str, str, str], ...] = (
    (
        "thermoscope_energy",
        "energy",
        "Training loss at the last merged step, mean over ranks (loss units); where agents see no "
        "loss (zero-code), the cumulative work since the job's first sample.",
    ),
    ("thermoscope_entropy_nats", "entropy", "Parameter entropy of the job, sum over layers (nats)."),
    (
        "thermoscope_temperature",
        "temperature",
        "Job temperature dE/dS over the window (loss units per nat); NaN: undefined.",
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
        "Layer temperature dE/dS over the window (loss units per nat); NaN: undefined.",
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
)


class MetricsExporter(Collector):
    """prometheus_client collector over the collector's jobs and counters."""

    def __init__(
        self,
        jobs: Mapping[str, Job],
        rejected: Mapping[str, int],
        version: str,
        phase_layers: int = 50,
        *,
        max_series: int = 2_000,
        nonfinite: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        if max_series < 2:
            raise ValueError(f"max_series must be at least 2, got {max_series}")
        self._jobs = jobs
        self._rejected = rejected
        self._version = version
        self._phase_layers = phase_layers
        self._max_series = max_series
        self._nonfinite = nonfinite if nonfinite is not None else {}

    def _fold(self, names: list[str], values: Any, additive: bool) -> Iterator[tuple[str, float]]:
        """(name, value) of one job's layers or sites, the excess folded into `OTHER`."""
        keep = self._max_series - 1 if len(names) > self._max_series else len(names)
        yield from zip(names[:keep], (float(v) for v in values[:keep]), strict=True)
        if keep < len(names):
            yield OTHER, float(sum(float(v) for v in values[keep:])) if additive else float("nan")

    def collect(self) -> Iterator[Metric]:
        jobs = list(self._jobs.values())  # one atomic copy: the event loop may add jobs meanwhile
        info = InfoMetricFamily("thermoscope_collector", "The Thermoscope collector.")
        info.add_metric([], {"version": self._version})
        yield info

        yield from self._liveness(jobs)
        received = CounterMetricFamily(
            "thermoscope_frames_received", "Frames accepted for the job.", labels=["job_id"]
        )
        for job in jobs:
            received.add_metric([job.job_id], job.frames_received)
        yield received
        duplicate = CounterMetricFamily(
            "thermoscope_frames_duplicate",
            "Frames replayed after a reconnect that the job had already applied: acknowledged, not applied.",
            labels=["job_id"],
        )
        for job in jobs:
            duplicate.add_metric([job.job_id], job.frames_duplicate)
        yield duplicate
        rejected = CounterMetricFamily(
            "thermoscope_frames_rejected", "Messages refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(dict(self._rejected).items()):
            rejected.add_metric([reason], count)
        yield rejected
        nonfinite = CounterMetricFamily(
            "thermoscope_nonfinite_values",
            "NaN/Inf values agents sent, by what carried them (energy, wall_time, layer, site): "
            "counted, never merged (the layer or site is NaN at that step).",
            labels=["job_id", "what"],
        )
        for (job_id, what), count in sorted(dict(self._nonfinite).items()):
            nonfinite.add_metric([job_id, what], count)
        yield nonfinite

        readings = [(job.job_id, job.reading) for job in jobs if job.reading is not None]
        yield from _families(
            JOB_GAUGES, ["job_id"], lambda attr: (([job_id], getattr(r, attr)) for job_id, r in readings)
        )
        yield from _families(
            LAYER_GAUGES,
            ["job_id", "layer"],
            lambda attr: (
                ([job_id, name], value)
                for job_id, r in readings
                for name, value in self._fold(list(r.layer_names), getattr(r, attr), attr in ADDITIVE)
            ),
        )
        yield from _families(
            (
                (
                    "thermoscope_site_efficiency_ratio",
                    "site_efficiency",
                    "Work efficiency 1 - Var(a)/Var(z) of the activation site.",
                ),
            ),
            ["job_id", "site"],
            lambda attr: (
                ([job_id, name], value)
                for job_id, r in readings
                for name, value in self._fold(list(r.site_names), getattr(r, attr), False)
            ),
        )
        folded_layers = GaugeMetricFamily(
            "thermoscope_layers_folded",
            "Layers of the job exported only inside its __other__ layer series (the collector's "
            "max_series_per_job bound on cardinality).",
            labels=["job_id"],
        )
        folded_sites = GaugeMetricFamily(
            "thermoscope_sites_folded",
            "Activation sites of the job exported only inside its __other__ site series.",
            labels=["job_id"],
        )
        for job_id, r in readings:
            for family, names in ((folded_layers, r.layer_names), (folded_sites, r.site_names)):
                over = len(names) - (self._max_series - 1)
                family.add_metric([job_id], float(over if len(names) > self._max_series else 0))
        yield folded_layers
        yield folded_sites
        engines = InfoMetricFamily(
            "thermoscope_engine",
            "Engine type of the activation site by its scale probe: "
            "A scale-invariant, B temperature-dependent.",
            labels=["job_id", "site"],
        )
        network = InfoMetricFamily(
            "thermoscope_network_engine",
            "Engine type of the network: A when all its sites are.",
            labels=["job_id"],
        )
        for job_id, r in readings:
            for name, engine in list(zip(r.site_names, r.site_engine, strict=True))[: self._max_series]:
                if engine:
                    engines.add_metric([job_id, name], {"engine": str(engine)})
            if r.engine:
                network.add_metric([job_id], {"engine": r.engine})
        yield engines
        yield network
        yield from self._phases(jobs)

    def _liveness(self, jobs: list[Job]) -> Iterator[Metric]:
        """Who streams: connected agents, stale ranks, ranks lost, paused jobs."""
        connected = GaugeMetricFamily(
            "thermoscope_agents_connected",
            "Agents streaming for the job: open streams whose rank is not stale.",
            labels=["job_id"],
        )
        stale = GaugeMetricFamily(
            "thermoscope_rank_stale",
            "1 if the rank is stale: its stream ended abnormally, or sent nothing for the collector's "
            "stale_after seconds while the job was not paused; 0 if it streams. A rank that "
            "finished (closed its stream cleanly) has no series.",
            labels=["job_id", "rank"],
        )
        lost = CounterMetricFamily(
            "thermoscope_rank_lost",
            "Times a rank of the job went stale (a rank that reconnects is live again).",
            labels=["job_id"],
        )
        paused = GaugeMetricFamily(
            "thermoscope_job_paused",
            "1 if the collector asked the job's agents to stop sampling (detached), else 0.",
            labels=["job_id"],
        )
        for job in jobs:
            live = job.liveness()
            connected.add_metric([job.job_id], live.connected)
            for rank, (_, is_stale) in live.ranks.items():
                stale.add_metric([job.job_id, str(rank)], float(is_stale))
            lost.add_metric([job.job_id], live.lost_total)
            paused.add_metric([job.job_id], float(job.paused))
        yield connected
        yield stale
        yield lost
        yield paused

    def _phases(self, jobs: list[Job]) -> Iterator[Metric]:
        """State-sets of the job's and its first `phase_layers` layers' phases, and transitions."""
        phase = GaugeMetricFamily(
            "thermoscope_phase",
            "Current phase (1) among type_i, transition, type_ii, refresh, unstable, for the job"
            ' (scope="job") and its first layers (scope="layer").',
            labels=["job_id", "scope", "layer", "phase"],
        )
        transitions = CounterMetricFamily(
            "thermoscope_phase_transitions",
            "Job-level phase transitions, by kind.",
            labels=["job_id", "from", "to"],
        )
        last = GaugeMetricFamily(
            "thermoscope_last_transition_timestamp_seconds",
            "When the job's last phase transition happened (Unix time).",
            labels=["job_id"],
        )
        for job in jobs:
            detector = job.detector
            if detector is None:
                continue
            scopes = [("job", "", detector.job_phase)]
            names = job.reading.layer_names if job.reading is not None else ()
            layer_phases = detector.layer_phases()[: self._phase_layers]
            scopes += [("layer", name, p) for name, p in zip(names, layer_phases, strict=False)]
            for scope, layer, current in scopes:
                for name in PHASES:
                    phase.add_metric([job.job_id, scope, layer, name], float(name == current))
            counts = dict(job.transitions)
            for before, after in TRANSITIONS:
                transitions.add_metric([job.job_id, before, after], counts.get((before, after), 0))
            if job.last_transition_time is not None:
                last.add_metric([job.job_id], job.last_transition_time)
        yield phase
        yield transitions
        yield last


def _families(
    specs: tuple[tuple[str, str, str], ...],
    labels: list[str],
    rows: Callable[[str], Iterator[tuple[list[str], Any]]],
) -> Iterator[GaugeMetricFamily]:
    for name, attr, doc in specs:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for label_values, value in rows(attr):
            family.add_metric(label_values, float(value))
        yield family
