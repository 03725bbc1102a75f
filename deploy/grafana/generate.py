"""The Thermoscope Grafana dashboard and alert rules, as code (grafana-foundation-sdk).

    python deploy/grafana/generate.py           # write dashboards/thermoscope.json and
                                                #   provisioning/alerting/thermoscope.yml
    python deploy/grafana/generate.py --check   # exit 1 if the committed files differ

Both files are generated: edit this file, not them (tests/test_grafana.py fails when they
drift). Every query names only series the collector exports (collector/exposition/catalogue.py) or
recording rules defined in deploy/prometheus; the datasource is the one provisioned in
provisioning/datasources/prometheus.yml, by its fixed uid.

The dashboard is Grafana's classic JSON model (`dashboard.Dashboard` of the SDK; the SDK
prefers its v2 schema, which file provisioning reads only behind feature flags). The alert
rules are built with the SDK's typed `alerting.Rule`, which is the HTTP API's shape; Grafana's
file-provisioning format differs in a few keys, mapped in `provisioning_rule`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

with warnings.catch_warnings():  # the classic dashboard builder warns at import: v2 is preferred
    warnings.simplefilter("ignore", DeprecationWarning)
    from grafana_foundation_sdk.builders import (
        alerting,
        expr,
        heatmap,
        prometheus,
        stat,
        statetimeline,
        table,
        timeseries,
    )
    from grafana_foundation_sdk.builders.common import VizLegendOptions
    from grafana_foundation_sdk.builders.dashboard import (
        AnnotationQuery,
        Dashboard,
        QueryVariable,
        Row,
        ThresholdsConfig,
    )
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import alerting as alerting_models
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as dashboard_models
    from grafana_foundation_sdk.models import heatmap as heatmap_models
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from thermoscope.science.detect import PHASES

HERE = Path(__file__).resolve().parent
DASHBOARD_FILE = HERE / "dashboards" / "thermoscope.json"
ALERTING_FILE = HERE / "provisioning" / "alerting" / "thermoscope.yml"

#: The Prometheus datasource's uid, as provisioned in provisioning/datasources/prometheus.yml.
DATASOURCE_UID = "thermoscope-prometheus"
DASHBOARD_UID = "thermoscope"
#: Folder of the provisioned dashboard (provisioning/dashboards/thermoscope.yml) and alert rules.
FOLDER = "Thermoscope"
RUNBOOK = "https://github.com/thermoscope/thermoscope/blob/main/deploy/RUNBOOK.md#{}"

DATASOURCE = common.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
#: Grafana's server-side expressions (threshold, math, reduce) run on this pseudo-datasource.
EXPRESSIONS = common.DataSourceRef(type_val="__expr__", uid="__expr__")
JOB = 'job_id=~"$job_id"'  # every panel follows the job_id variable

PHASE_COLORS = {
    "type_i": "blue",
    "transition": "orange",
    "type_ii": "green",
    "refresh": "purple",
    "unstable": "red",
}
assert set(PHASE_COLORS) == set(PHASES), "a phase without a color: update PHASE_COLORS"


def phase_code(scope: str, by: str) -> str:
    """The current phase of each job (or layer) as its index in PHASES, 1-based.

    `thermoscope_phase` is a state-set (1 for the current phase, 0 for the others); a state
    timeline wants one series per job whose value is the state, so each phase's 0/1 is
    weighted by its code and summed. Value mappings (`phase_mappings`) name the codes.
    """
    terms = [
        f'{code} * sum by ({by}) (thermoscope_phase{{scope="{scope}",{JOB},phase="{name}"}})'
        for code, name in enumerate(PHASES, 1)
    ]
    return "\n  + ".join(terms)


def phase_mappings() -> list[dashboard_models.ValueMapping]:
    return [
        dashboard_models.ValueMap(
            options={
                str(code): dashboard_models.ValueMappingResult(text=name, color=PHASE_COLORS[name], index=i)
                for i, (code, name) in enumerate(enumerate(PHASES, 1))
            }
        )
    ]


def state_mappings(states: dict[int, tuple[str, str]]) -> list[dashboard_models.ValueMapping]:
    return [
        dashboard_models.ValueMap(
            options={
                str(value): dashboard_models.ValueMappingResult(text=text, color=color, index=i)
                for i, (value, (text, color)) in enumerate(states.items())
            }
        )
    ]


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
        .steps([dashboard_models.Threshold(value=v, color=c) for v, c in steps])
    )


def _columns(*names: str) -> dashboard_models.DataTransformerConfig:
    """A table's columns: these labels in this order, without the series' own fields."""
    hidden = dict.fromkeys(("Time", "Value", "__name__", "instance", "job"), True)
    return dashboard_models.DataTransformerConfig(
        id_val="organize",
        options={"excludeByName": hidden, "indexByName": {name: i for i, name in enumerate(names)}},
    )


def query(expression: str, legend: str = "", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().datasource(DATASOURCE).expr(expression).ref_id(ref)
    if legend:
        q = q.legend_format(legend)
    return q.instant() if instant else q.range()


#: A DCGM exporter field per rank: `thermoscope_rank_info`'s host is DCGM's `Hostname`, its gpu
#: DCGM's `gpu` (the physical index); many ranks may share a GPU, each GPU has one series.
GPU_JOIN = (
    'label_replace(thermoscope_rank_info{{{job},gpu!=""}}, "Hostname", "$1", "host", "(.*)")'
    " * on (Hostname, gpu) group_left () {field}"
)


def legend() -> VizLegendOptions:
    return (
        VizLegendOptions()
        .show_legend(True)
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
    )


class Ids:
    """Panel ids, in the order the panels are added (alert rules link to some of them)."""

    def __init__(self) -> None:
        self.last = 0
        self.by_title: dict[str, int] = {}

    def __call__(self, builder: Any, title: str) -> Any:
        self.last += 1
        self.by_title[title] = self.last
        return builder.id(self.last).title(title)


def ts(ids: Ids, title: str, description: str, *targets: prometheus.Dataquery, unit: str = "") -> Any:
    panel = (
        ids(timeseries.Panel(), title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .legend(legend())
        .span(12)
        .height(8)
    )
    return panel.unit(unit) if unit else panel


#: How a temperature's +- standard error bounds are drawn beside it.
DASHED = [
    dashboard_models.DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [4, 4]}),
    dashboard_models.DynamicConfigValue("custom.lineWidth", 1),
]


def big(ids: Ids, title: str, description: str, target: prometheus.Dataquery) -> stat.Panel:
    return (
        ids(stat.Panel(), title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(target)
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .span(4)
        .height(4)
    )


def dashboard() -> tuple[dict[str, Any], dict[str, int]]:
    """The dashboard's JSON model, and its panel ids by title."""
    ids = Ids()
    job_phase = phase_code("job", "job_id")
    d = (
        Dashboard("Thermoscope")
        .uid(DASHBOARD_UID)
        .description(
            "Thermodynamics of training, per job: energy, entropy, temperature, efficiency, "
            "phases, per-layer temperatures, activation sites, agents. Generated by "
            "deploy/grafana/generate.py."
        )
        .tags(["thermoscope"])
        .refresh("10s")
        .time("now-1h", "now")
        .timezone(common.TimeZoneBrowser)
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            QueryVariable("job_id")
            .label("Job")
            .description("Training job (Ray's job id, or the Monitor's job=)")
            .datasource(DATASOURCE)
            .query("label_values(thermoscope_last_step, job_id)")
            .definition("label_values(thermoscope_last_step, job_id)")
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.NATURAL_ASC)
            .multi(True)
            .include_all(True)
        )
        .annotation(
            AnnotationQuery()
            .name("Phase transitions")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("orange")
            .target(
                prometheus.Dataquery()
                .datasource(DATASOURCE)
                .ref_id("Anno")
                .expr(f"increase(thermoscope_phase_transitions_total{{{JOB}}}[1m]) > 0")
            )
            .step("1m")
            .title_format("{{job_id}}: {{from}} → {{to}}")
            .text_format("phase transition detected by the collector")
            .tag_keys("job_id,from,to")
            .use_value_for_time(False)
        )
        .annotation(
            AnnotationQuery()
            .name("Findings")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("red")
            .target(
                prometheus.Dataquery()
                .datasource(DATASOURCE)
                .ref_id("Findings")
                .expr(f"increase(thermoscope_findings_total{{{JOB}}}[1m]) > 0")
            )
            .step("1m")
            .title_format("{{job_id}}: {{finding}}")
            .text_format("finding raised by the collector (docs/findings.md; thermoscope events --finding)")
            .tag_keys("job_id,finding")
            .use_value_for_time(False)
        )
    )

    d = d.with_row(ids(Row("Job"), "Job"))
    d = (
        d.with_panel(
            big(ids, "Phase", "The job's current phase (science/detect.py)", query(job_phase, "{{job_id}}"))
            .mappings(phase_mappings())
            .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        )
        .with_panel(
            big(
                ids,
                "Last step",
                "Last optimizer step merged",
                query(f"thermoscope_last_step{{{JOB}}}", "{{job_id}}"),
            ).color_mode(common.BigValueColorMode.NONE)
        )
        .with_panel(
            big(
                ids,
                "Agents connected",
                "Open agent streams whose rank is not stale",
                query(f"thermoscope_agents_connected{{{JOB}}}", "{{job_id}}"),
            ).color_mode(common.BigValueColorMode.NONE)
        )
        .with_panel(
            big(
                ids,
                "Stale ranks",
                "Ranks whose stream broke or fell silent (0 when every rank streams or finished)",
                query(
                    f"sum by (job_id) (thermoscope_rank_stale{{{JOB}}})"
                    f" or on (job_id) 0 * thermoscope_agents_connected{{{JOB}}}",
                    "{{job_id}}",
                ),
            ).thresholds(thresholds((None, "green"), (1, "red")))
        )
        .with_panel(
            big(
                ids,
                "Network engine",
                "A: every activation site is scale-invariant; B: some site's efficiency moves with "
                "its input temperature",
                query(f"thermoscope_network_engine_info{{{JOB}}}", "{{engine}}", instant=True),
            )
            .text_mode(common.BigValueTextMode.NAME)
            .color_mode(common.BigValueColorMode.NONE)
        )
        .with_panel(
            big(
                ids,
                "Sampling",
                "Paused: the collector asked the job's agents to stop sampling (thermoscope detach)",
                query(f"thermoscope_job_paused{{{JOB}}}", "{{job_id}}"),
            ).mappings(state_mappings({0: ("streaming", "green"), 1: ("paused", "yellow")}))
        )
        .with_panel(
            ids(statetimeline.Panel(), "Phase over time")
            .description(
                "type_i: as initialized; transition: learning; type_ii: trained; refresh: a trained "
                "job relearning after a jump in its loss (a data shift); unstable: diverging"
            )
            .datasource(DATASOURCE)
            .with_target(query(job_phase, "{{job_id}}"))
            .mappings(phase_mappings())
            .show_value(common.VisibilityMode.AUTO)
            .merge_values(True)
            .legend(legend())
            .span(24)
            .height(5)
        )
        .with_panel(
            ts(
                ids,
                "Energy",
                "Training loss (mean over ranks), handed over or captured from backward(); "
                "where none is seen, the cumulative work (thermoscope_energy_from_work = 1)",
                query(f"thermoscope_energy{{{JOB}}}", "{{job_id}}"),
            )
        )
        .with_panel(
            ts(
                ids,
                "Entropy",
                "Parameter entropy of the job, sum over layers",
                query(f"thermoscope_entropy_nats{{{JOB}}}", "{{job_id}}"),
                unit="nats",
            )
        )
        .with_panel(
            ts(
                ids,
                "Temperature",
                "dE/dS over the window (loss units per nat), dashed: +- 1 standard error; gaps: "
                "undefined (the loss's or the entropy's slope is not significant). Negative: the "
                "entropy grows while the energy falls",
                query(f"thermoscope_temperature{{{JOB}}}", "{{job_id}}"),
                *(
                    query(
                        f"thermoscope_temperature{{{JOB}}} {sign} thermoscope_temperature_stderr{{{JOB}}}",
                        f"{{{{job_id}}}} T {sign} s.e.",
                        ref,
                    )
                    for sign, ref in (("-", "B"), ("+", "C"))
                ),
            )
            .override_by_query("B", DASHED)
            .override_by_query("C", DASHED)
        )
        .with_panel(
            ts(
                ids,
                "Site efficiencies",
                "The distribution of the activation sites' work efficiencies: quantiles q (0.5: the median), "
                "and the lowest and highest with their sites; negative where a site amplifies its input",
                query(f"thermoscope_site_efficiency_quantile_ratio{{{JOB}}}", "{{job_id}} q{{q}}"),
                query(
                    f"thermoscope_site_efficiency_extreme_ratio{{{JOB}}}",
                    "{{job_id}} {{extreme}} {{site}}",
                    "B",
                ),
                unit="percentunit",
            )
            .override_by_query("B", DASHED)
            .max(1)
        )
    )

    d = d.with_row(ids(Row("Layers: $job_id"), "Layers: $job_id").repeat("job_id"))
    d = (
        d.with_panel(
            ids(heatmap.Panel(), "Layer temperature")
            .description(
                "Temperature dE/dS of each layer (one row per layer) over time; blank: undefined (its "
                "entropy or work change is not significant; the query drops NaN: see the layer's work "
                "share and entropy change below for what is measurable). "
                "|T| falling to 0: the layer is freezing; negative: its weights spread while the "
                "loss falls"
            )
            .datasource(DATASOURCE)
            # `> -Inf` drops undefined (NaN) values: only defined temperatures are drawn
            .with_target(query(f"thermoscope_layer_temperature{{{JOB}}} > -Inf", "{{layer}}"))
            .calculate(False)
            .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.UNKNOWN).value("T"))
            .filter_values(heatmap.FilterValueRange())  # keep every value: temperatures can be negative
            .color(
                heatmap.HeatmapColorOptions()
                .mode(heatmap_models.HeatmapColorMode.SCHEME)
                .scheme("RdBu")
                .reverse(True)
                .scale(heatmap_models.HeatmapColorScale.LINEAR)
                .exponent(0.5)
                .fill("dark-orange")
                .steps(64)
            )
            .y_axis(heatmap.YAxisConfig().axis_label("layer"))
            .show_legend()
            .span(24)
            .height(10)
        )
        .with_panel(
            ids(statetimeline.Panel(), "Layer phases")
            .description("Phase of each of the job's first layers (the collector's --phase-layers)")
            .datasource(DATASOURCE)
            .with_target(query(phase_code("layer", "job_id, layer"), "{{layer}}"))
            .mappings(phase_mappings())
            .show_value(common.VisibilityMode.NEVER)
            .merge_values(True)
            .legend(legend())
            .span(24)
            .height(8)
        )
        .with_panel(
            ts(
                ids,
                "Layer entropy",
                "Gaussian entropy n * h of each layer",
                query(f"thermoscope_layer_entropy_nats{{{JOB}}}", "{{layer}}"),
                unit="nats",
            )
        )
        .with_panel(
            ts(
                ids,
                "Layer work",
                "Work <g, delta theta> of the last sampled update on each layer (negative: lowered the loss)",
                query(f"thermoscope_layer_work{{{JOB}}}", "{{layer}}"),
            )
        )
        .with_panel(
            ts(
                ids,
                "Layer work share",
                "Each layer's share of the window's |work| (sums to 1). Where a layer's temperature is "
                "blank, this says why: a layer with a small share does too little work for its temperature "
                "to be measurable; the layers with most of the work have one while the model learns",
                query(f"thermoscope_layer_work_share_ratio{{{JOB}}}", "{{layer}}"),
                unit="percentunit",
            )
        )
        .with_panel(
            ts(
                ids,
                "Layer entropy change",
                "Entropy change of each layer over its temperature window (nats): measurable where its "
                "temperature is not",
                query(f"thermoscope_layer_entropy_change_nats{{{JOB}}}", "{{layer}}"),
                unit="nats",
            )
        )
        .with_panel(
            ts(
                ids,
                "Layer non-Gaussianity",
                "Negentropy h_gauss - h_hist per value (0 for a Gaussian shape)",
                query(f"thermoscope_layer_negentropy_nats{{{JOB}}}", "{{layer}}"),
                unit="nats",
            )
        )
        .with_panel(
            ts(
                ids,
                "Outside histogram edges",
                "Share of each layer's histogram subset outside its fixed edges (should stay near 0)",
                query(f"thermoscope_layer_outside_edges_ratio{{{JOB}}}", "{{layer}}"),
                unit="percentunit",
            )
        )
    )

    d = d.with_row(ids(Row("Activation sites"), "Activation sites"))
    d = d.with_panel(
        ts(
            ids,
            "Site efficiency",
            "Work efficiency 1 - Var(a)/Var(z) of each activation site (ReLU: 0.659 for Gaussian inputs)",
            query(f"thermoscope_site_efficiency_ratio{{{JOB}}}", "{{job_id}} {{site}}"),
            unit="percentunit",
        )
        .max(1)
        .span(16)
    ).with_panel(
        ids(table.Panel(), "Engine type by site")
        .description(
            "A: scale-invariant (its efficiency ignores its input's temperature); B: temperature-dependent"
        )
        .datasource(DATASOURCE)
        .with_target(query(f"thermoscope_engine_info{{{JOB}}}", instant=True).format(PromQueryFormat.TABLE))
        .with_transformation(_columns("job_id", "site", "engine"))
        .span(8)
        .height(8)
    )

    d = d.with_row(ids(Row("Findings"), "Findings"))
    d = d.with_panel(
        ids(table.Panel(), "Findings that hold")
        .description(
            "What is wrong and where (docs/findings.md): each finding that holds now, with the layer or site "
            "it is about (empty: the job's). Its history: thermoscope events --json"
        )
        .datasource(DATASOURCE)
        .with_target(query(f"thermoscope_finding{{{JOB}}} == 1", instant=True).format(PromQueryFormat.TABLE))
        .with_transformation(_columns("job_id", "finding", "layer"))
        .span(24)
        .height(6)
    )

    d = d.with_row(ids(Row("Agents and collector"), "Agents and collector"))
    d = (
        d.with_panel(
            ts(
                ids,
                "Agents connected and stale ranks",
                "Streaming agents, and ranks whose stream broke or fell silent for --stale-after seconds",
                query(f"thermoscope_agents_connected{{{JOB}}}", "{{job_id}} connected"),
                query(f"sum by (job_id) (thermoscope_rank_stale{{{JOB}}})", "{{job_id}} stale", ref="B"),
            )
        )
        .with_panel(
            ids(statetimeline.Panel(), "Rank liveness")
            .description("Each rank that streams (live) or went stale; a rank that finished has no row")
            .datasource(DATASOURCE)
            .with_target(query(f"thermoscope_rank_stale{{{JOB}}}", "{{job_id}} rank {{rank}}"))
            .mappings(state_mappings({0: ("live", "green"), 1: ("stale", "red")}))
            .show_value(common.VisibilityMode.NEVER)
            .merge_values(True)
            .legend(legend())
            .span(12)
            .height(8)
        )
        .with_panel(
            ts(
                ids,
                "Frames",
                "Frames accepted per second, by job; messages refused, by reason",
                query(
                    f"sum by (job_id) (rate(thermoscope_frames_received_total{{{JOB}}}[$__rate_interval]))",
                    "{{job_id}} received",
                ),
                query(
                    "sum by (reason) (rate(thermoscope_frames_rejected_total[$__rate_interval]))",
                    "rejected: {{reason}}",
                    ref="B",
                ),
                unit="reqps",
            )
        )
        .with_panel(
            ts(
                ids,
                "Ranks lost",
                "Times a rank of the job went stale, per 5 minutes",
                query(f"increase(thermoscope_rank_lost_total{{{JOB}}}[5m])", "{{job_id}}"),
            ).span(6)
        )
        .with_panel(
            big(
                ids,
                "Collectors up",
                "Prometheus's scrape of each Thermoscope collector, with the collector's version",
                query(
                    'up{job=~"thermoscope.*"} * on (instance) group_left (version) thermoscope_collector_info'
                    ' or on (instance) up{job=~"thermoscope.*"}',
                    "{{instance}} {{version}}",
                ),
            )
            .mappings(state_mappings({0: ("down", "red"), 1: ("up", "green")}))
            .span(6)
            .height(8)
        )
        .with_panel(
            ts(
                ids,
                "GPU utilization of each rank (DCGM exporter)",
                "Each rank's GPU, joined from thermoscope_rank_info to NVIDIA's DCGM exporter on its "
                "labels (Hostname, gpu): a layer's finding beside the GPU it ran on (docs/metrics.md, "
                "Placement). Empty without a DCGM exporter, or for ranks on CPU.",
                query(
                    GPU_JOIN.format(job=JOB, field="DCGM_FI_DEV_GPU_UTIL"),
                    "{{job_id}} rank {{rank}}: {{Hostname}} GPU {{gpu}}",
                ),
                unit="percent",
            )
        )
    )
    model = json.loads(JSONEncoder(sort_keys=True).encode(d.build()))
    return model, ids.by_title


@dataclass(frozen=True)
class Alert:
    """A Prometheus-style alert `expr op threshold`, as a Grafana query and threshold expression."""

    name: str
    expr: str
    op: str  # "gt", "lt", "eq": Grafana's threshold evaluator
    threshold: float
    for_: str
    keep_firing_for: str | None
    severity: str
    summary: str
    description: str
    panel: str  # the dashboard panel the alert links to

    @property
    def promql(self) -> str:
        """The Prometheus rule's expression this alert is equivalent to."""
        symbol = {"gt": ">", "lt": "<", "eq": "=="}[self.op]
        return f"{self.expr} {symbol} {self.threshold:g}"


#: The Grafana-managed equivalents of the Prometheus alerts in deploy/prometheus (same names).
ALERTS = (
    Alert(
        "ThermoscopeDataShift",
        'increase(thermoscope_phase_transitions_total{to="refresh"}[10m])',
        "gt",
        0,
        "0m",
        "15m",
        "warning",
        "Job {{ $labels.job_id }} is relearning after a data shift",
        "The collector saw job {{ $labels.job_id }} go from {{ $labels.from }} to refresh: a trained "
        "job's loss jumped and it started learning again (its data changed).",
        "Phase over time",
    ),
    Alert(
        "ThermoscopeUnstable",
        'thermoscope_phase{scope="job",phase="unstable"}',
        "eq",
        1,
        "1m",
        "5m",
        "critical",
        "Job {{ $labels.job_id }} is unstable",
        "The energy (loss) of job {{ $labels.job_id }} is rising significantly with no data shift to "
        "absorb: divergence or loss spikes.",
        "Phase over time",
    ),
    Alert(
        "ThermoscopeAgentsDisappeared",
        "max by (job_id) (thermoscope_rank_stale)",
        "eq",
        1,
        "2m",
        "5m",
        "warning",
        "Ranks of job {{ $labels.job_id }} stopped streaming",
        "At least one rank of job {{ $labels.job_id }} broke its stream or sent nothing for the "
        "collector's --stale-after seconds while the job was not paused.",
        "Rank liveness",
    ),
    Alert(
        "ThermoscopeCollectorDown",
        'up{job=~"thermoscope.*"}',
        "eq",
        0,
        "1m",
        None,
        "critical",
        "Thermoscope collector {{ $labels.instance }} is down",
        "Prometheus cannot scrape the collector at {{ $labels.instance }} (job {{ $labels.job }}): "
        "agents keep training and drop their oldest frames until it is back.",
        "Collectors up",
    ),
    Alert(
        "ThermoscopeNegativeLayerTemperature",
        "thermoscope_layer_temperature",
        "lt",
        0,
        "5m",
        "5m",
        "warning",
        "Layer {{ $labels.layer }} of job {{ $labels.job_id }} has a negative temperature",
        "The entropy of layer {{ $labels.layer }} has been growing while the energy falls for 5 "
        "minutes: its weights spread out (expected early in training from a narrow init).",
        "Layer temperature",
    ),
)


def alert_rule(alert: Alert) -> alerting.Rule:
    threshold = (
        expr.TypeThreshold()
        .datasource(EXPRESSIONS)
        .ref_id("B")
        .expression("A")
        .conditions(
            [
                expr.ExprTypeThresholdConditions().evaluator(
                    expr.ExprTypeThresholdConditionsEvaluator().type(alert.op).params([alert.threshold])
                )
            ]
        )
    )
    rule = (
        alerting.Rule(alert.name)
        .uid(alert.name.lower())
        .condition("B")
        .queries(
            [
                alerting.Query("A")
                .datasource_uid(DATASOURCE_UID)
                .relative_time_range(alerting_models.RelativeTimeRange(from_val=600, to=0))
                .model(prometheus.Dataquery().datasource(DATASOURCE).ref_id("A").expr(alert.expr).instant()),
                alerting.Query("B").datasource_uid(EXPRESSIONS.uid).model(threshold),
            ]
        )
        .for_val(alert.for_)
        .no_data_state("OK")  # no series: nothing to alert on, as in Prometheus
        .exec_err_state("Error")
        .labels({"severity": alert.severity})
        .annotations(
            {
                "summary": alert.summary,
                "description": alert.description,
                "runbook_url": RUNBOOK.format(alert.name.lower()),
            }
        )
    )
    return rule.keep_firing_for(alert.keep_firing_for) if alert.keep_firing_for else rule


def provisioning_rule(rule: dict[str, Any], panel_id: int) -> dict[str, Any]:
    """An alert rule in the HTTP API's shape (the SDK's) as Grafana's provisioning file wants it.

    The file names its folder and group once per group (not per rule), spells the API's
    `keep_firing_for` as `keepFiringFor`, and links a rule to a panel with `dashboardUid` and
    `panelId` (the API uses the `__dashboardUid__`/`__panelId__` annotations).
    """
    rule = dict(rule)
    for key in ("folderUID", "ruleGroup", "orgID"):
        del rule[key]
    if "keep_firing_for" in rule:
        rule["keepFiringFor"] = rule.pop("keep_firing_for")
    order = ["uid", "title", "condition", "data", "dashboardUid", "panelId", "noDataState", "execErrState"]
    order += ["for", "keepFiringFor", "labels", "annotations"]
    rule |= {"dashboardUid": DASHBOARD_UID, "panelId": panel_id}
    assert set(rule) <= set(order), set(rule) - set(order)
    return {key: rule[key] for key in order if key in rule}


def alert_rules(panel_ids: dict[str, int]) -> dict[str, Any]:
    rules = [
        provisioning_rule(json.loads(JSONEncoder().encode(alert_rule(a).build())), panel_ids[a.panel])
        for a in ALERTS
    ]
    group = {"orgId": 1, "name": "thermoscope", "folder": FOLDER, "interval": "30s", "rules": rules}
    return {"apiVersion": 1, "groups": [group]}


def render() -> dict[Path, str]:
    """The generated files' contents."""
    model, panel_ids = dashboard()
    header = "# Generated by deploy/grafana/generate.py: edit that, then run it. Grafana file provisioning.\n"
    rules = yaml.safe_dump(alert_rules(panel_ids), sort_keys=False, allow_unicode=True, width=100)
    return {
        DASHBOARD_FILE: json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        ALERTING_FILE: header + rules,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = p.parse_args(argv)
    stale = []
    for path, text in render().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{path} is not what generate.py makes: run python deploy/grafana/generate.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
