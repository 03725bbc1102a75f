"""The metric catalogue: what each family of `/metrics` is (its name, type, help and labels), in
the order the body lists them. What the families hold is read from the jobs at each scrape
(export.py); how they are spelled is the writer's (writer.py).

Metric names and labels are a contract (dashboards and alert rules depend on them):
base units, `_total` counters, the job label is `job_id` (Prometheus owns `job` and
`instance`), and no per-layer series carries a `rank` label: ranks are merged first, so a
job's series count is layers + sites, whatever its world size. NaN means undefined (a
temperature whose entropy or energy change is not significant over the window; its standard
error is NaN there too).
"""

from __future__ import annotations

from dataclasses import dataclass

from thermoscope.science.physics import CONFIDENCE

#: The series the layers (sites, ranks) of a job beyond `max_series` are folded into.
OTHER = "__other__"
#: Layer readings that are sums over values, so a sum over layers folds them exactly.
ADDITIVE = frozenset({"layer_entropy", "layer_histogram_entropy", "layer_work"})


@dataclass(frozen=True)
class Family:
    """A family as exposed: `name` is its samples' name (with `_total`, `_info`); `type` its
    Prometheus type; `labels` the names of its samples' labels."""

    name: str
    type: str
    help: str
    labels: tuple[str, ...] = ("job_id",)


#: The job's readings: (family name, `Reading` attribute, help), a gauge labelled by `job_id`.
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
        f"or the energy's slope not significant at {CONFIDENCE:.0%} (Newey-West errors, Fieller interval).",
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
    ("thermoscope_last_step", "step", "Last optimizer step merged for the job."),
)
#: The layers' readings, as `JOB_GAUGES`, labelled by `job_id` and `layer`.
LAYER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("thermoscope_layer_entropy_nats", "layer_entropy", "Layer entropy n * h, gaussian estimator (nats)."),
    (
        "thermoscope_layer_temperature",
        "layer_temperature",
        "Layer temperature dE/dS over the window (loss units per nat); NaN: undefined, the layer's "
        f"entropy or work change not significant at {CONFIDENCE:.0%} (Newey-West errors, Fieller interval).",
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
    (
        "thermoscope_layer_entropy_change_nats",
        "layer_entropy_change",
        "Layer entropy change over the temperature window (nats): measurable where the temperature is not.",
    ),
    (
        "thermoscope_layer_work_share_ratio",
        "layer_work_share",
        "Layer's share of the window's work, |dE_l| / sum over layers of |dE|: a layer with little work "
        "has no measurable temperature.",
    ),
)

#: The sites' reading, as `JOB_GAUGES`, labelled by `job_id` and `site`.
SITE_GAUGE = (
    "thermoscope_site_efficiency_ratio",
    "site_efficiency",
    "Work efficiency 1 - Var(a)/Var(z) of the activation site.",
)
#: The operating point each site's engine type was read at, as `SITE_GAUGE`.
SITE_SCALE_GAUGE = (
    "thermoscope_site_input_scale",
    "site_input_scale",
    "RMS of the activation site's input at its last scale probe: the operating point its engine type "
    "belongs to (a sigmoid at a tiny scale is linear, type A).",
)

#: Every family, in the order of the body.
FAMILIES: tuple[Family, ...] = (
    Family("thermoscope_collector_info", "gauge", "The Thermoscope collector.", ("version",)),
    Family(
        "thermoscope_agents_connected",
        "gauge",
        "Agents streaming for the job: open streams whose rank is not stale.",
    ),
    Family(
        "thermoscope_rank_stale",
        "gauge",
        "1 if the rank is stale: its stream ended abnormally, or sent nothing for the collector's "
        "stale_after seconds while the job was not paused; 0 if it streams. A rank that "
        "finished (closed its stream cleanly) has no series.",
        ("job_id", "rank"),
    ),
    Family(
        "thermoscope_rank_info",
        "gauge",
        "Where each rank of thermoscope_rank_stale runs, in the labels the cluster's exporters use "
        "(DCGM exporter: Hostname, gpu; kube-state-metrics: pod), to join a job to its GPUs; "
        '"" where the agent could not tell (pod outside Kubernetes, gpu on CPU).',
        ("job_id", "rank", "host", "pod", "gpu"),
    ),
    Family(
        "thermoscope_rank_lost_total",
        "counter",
        "Times a rank of the job went stale (a rank that reconnects is live again).",
    ),
    Family(
        "thermoscope_job_paused",
        "gauge",
        "1 if the collector asked the job's agents to stop sampling (detached), else 0.",
    ),
    Family(
        "thermoscope_run_info",
        "gauge",
        "The run the job shows, as its agents name it: a Ray Train job's run name (RunConfig(name=...)), "
        "else the launcher's run id; none where the agents named no run.",
        ("job_id", "run"),
    ),
    Family("thermoscope_frames_received_total", "counter", "Frames accepted for the job."),
    Family(
        "thermoscope_frames_duplicate_total",
        "counter",
        "Frames replayed after a reconnect that the job had already applied: acknowledged, not applied.",
    ),
    Family("thermoscope_frames_rejected_total", "counter", "Messages refused, by reason.", ("reason",)),
    Family(
        "thermoscope_nonfinite_values_total",
        "counter",
        "NaN/Inf values agents sent, by what carried them (energy, wall_time, layer, site): "
        "counted, never merged (the layer or site is NaN at that step).",
        ("job_id", "what"),
    ),
    *(Family(name, "gauge", doc) for name, _, doc in JOB_GAUGES),
    *(Family(name, "gauge", doc, ("job_id", "layer")) for name, _, doc in LAYER_GAUGES),
    Family(SITE_GAUGE[0], "gauge", SITE_GAUGE[2], ("job_id", "site")),
    Family(
        "thermoscope_site_efficiency_quantile_ratio",
        "gauge",
        "Quantile q of the job's site efficiencies (q 0 and 1: the extremes, 0.5: the median), over the "
        "sites with one; negative where sites amplify their input.",
        ("job_id", "q"),
    ),
    Family(
        "thermoscope_site_efficiency_extreme_ratio",
        "gauge",
        "The lowest (extreme=min) and the highest (extreme=max) site efficiency of the job, at its site.",
        ("job_id", "extreme", "site"),
    ),
    Family(
        "thermoscope_layers_folded",
        "gauge",
        "Layers of the job exported only inside its __other__ layer series (the collector's "
        "max_series_per_job bound on cardinality).",
    ),
    Family(
        "thermoscope_sites_folded",
        "gauge",
        "Activation sites of the job exported only inside its __other__ site series.",
    ),
    Family(SITE_SCALE_GAUGE[0], "gauge", SITE_SCALE_GAUGE[2], ("job_id", "site")),
    Family(
        "thermoscope_engine_info",
        "gauge",
        "Engine type of the activation site by its scale probe: A scale-invariant, B temperature-dependent "
        "(at its operating point: thermoscope_site_input_scale); function: what it applies.",
        ("job_id", "site", "engine", "function"),
    ),
    Family(
        "thermoscope_site_info",
        "gauge",
        "What each activation site of the job applies, its site label being a module path (an index "
        'in a Sequential: site="1"): function, with its parameters ("ReLU6()", "Tanh()"), '
        'and kind, the module class or function call the agent caught ("ReLU", "gelu()"); "" where the '
        "agent did not say.",
        ("job_id", "site", "function", "kind"),
    ),
    Family(
        "thermoscope_network_engine_info",
        "gauge",
        "Engine type of the network: A when all its sites are.",
        ("job_id", "engine"),
    ),
    Family(
        "thermoscope_phase",
        "gauge",
        "Current phase (1) among type_i, transition, type_ii, refresh, unstable, for the job"
        ' (scope="job") and its first layers (scope="layer").',
        ("job_id", "scope", "layer", "phase"),
    ),
    Family(
        "thermoscope_phase_transitions_total",
        "counter",
        "Job-level phase transitions, by kind.",
        ("job_id", "from", "to"),
    ),
    Family(
        "thermoscope_finding",
        "gauge",
        "1 while a finding holds (docs/findings.md): finding is its name, layer the layer or site it is "
        'about ("" for the job\'s); beyond max_series_per_job of one finding, the rest fold into __other__.',
        ("job_id", "finding", "layer"),
    ),
    Family(
        "thermoscope_findings_total",
        "counter",
        "Findings raised for the job, by name (every name from the job's first merged step, at 0).",
        ("job_id", "finding"),
    ),
    Family(
        "thermoscope_last_transition_timestamp_seconds",
        "gauge",
        "When the job's last phase transition happened (Unix time).",
    ),
)
