"""`/metrics` rendering: the direct text path writes what prometheus_client wrote before it.

The oracle is the previous exporter (a prometheus_client custom collector, as of c6482c8),
restated below as `previous_families` and rendered by `prometheus_client.generate_latest`; both
bodies are parsed and compared family by family (order, HELP, TYPE) and sample by sample
(names, label sets, values with NaN and +-Inf), over jobs built to hit escaping, folding,
engines, phases, liveness and jobs without a reading.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from thermoscope.collector.detect import PHASES, TRANSITIONS, PhaseDetector
from thermoscope.collector.export import (
    ADDITIVE,
    CONTENT_TYPE,
    JOB_GAUGES,
    LAYER_GAUGES,
    OTHER,
    SITE_GAUGE,
    MetricsExporter,
)
from thermoscope.collector.merge import Job, Stream
from thermoscope.science.derive import Reading
from thermoscope.science.stats import SiteInfo

from conftest import frame, hello, layer_table, sample, stream

WEIRD = 'we"ird\\job\nwith %s and é'


def reading(layer_names, site_names, *, step=7, engine="A", **arrays) -> Reading:
    n, m = len(layer_names), len(site_names)
    rng = np.random.default_rng(n + m)
    columns = {
        attr: rng.normal(size=n) * 10.0 ** rng.integers(-6, 8, size=n)
        for _, attr, _ in LAYER_GAUGES
        if attr not in arrays
    }
    columns.update(arrays)
    return Reading(
        step=step,
        wall_time=1.7e9,
        energy=0.25,
        entropy=-1234.5678,
        beta=math.inf,
        temperature=math.nan,
        efficiency=0.5,
        layer_names=tuple(layer_names),
        site_names=tuple(site_names),
        site_efficiency=rng.random(m),
        site_engine=np.array(["A", "", "B"] * m)[:m],
        engine=engine,
        **columns,
    )


def open_stream(job: Job, rank: int, world_size: int = 2) -> Stream:
    s = Stream(
        job_id=job.job_id,
        run_id="r",
        rank=rank,
        world_size=world_size,
        host="h",
        local_rank=rank,
        node="",
        every=1,
        layers=layer_table(2),
        sites=[SiteInfo("s", "ReLU")],
        bins=8,
    )
    job.open(s)
    return s


def jobs_of_every_kind() -> dict[str, Job]:
    """Jobs that exercise each rendering path (`max_series=4`, `phase_layers=3` below)."""
    jobs: dict[str, Job] = {}

    merged = Job("merged", window=10)  # through the real merge path
    s = open_stream(merged, 0, world_size=1)
    for step in range(4):
        s.last_seq = step + 1
        merged.accept(s, sample(step, n_layers=2, energy=1.0 / (step + 1)))
    jobs[merged.job_id] = merged

    weird = Job(WEIRD, window=10)  # labels to escape, more layers and sites than max_series
    names = ['l"%d1', "l\\2", "l\n3", "l4", "é5", "l6", "l7"]
    weird.reading = reading(
        names,
        ["s1", 's"2', "s3", "s4", "s5"],
        layer_entropy=np.array([1.0, 2.0, 3.0, 0.1, 0.2, 0.3, 1e300]),
        layer_temperature=np.array([-math.inf, math.inf, math.nan, 0.0, -0.0, 5e-324, 1.0]),
        layer_work=np.array([1.0, 2.0, 3.0, math.nan, 1.0, 1.0, 1.0]),
    )
    weird.detector = PhaseDetector(len(names))
    weird.detector.job = 2
    weird.detector.layers[:] = [0, 1, 2, 3, 4, 0, 1]
    weird.transitions[("type_i", "transition")] = 2
    weird.last_transition_time = 1.7e9 + 0.25
    lost = open_stream(weird, 1)
    open_stream(weird, 0)
    weird.close(lost, clean=False)
    weird.set_paused(True)
    weird.frames_received, weird.frames_duplicate = 12_345_678, 3
    jobs[weird.job_id] = weird

    short = Job("short", window=10)  # a detector with fewer layers than the reading (mid-update)
    short.reading = reading(["a", "b", "c"], [], engine="")
    short.detector = PhaseDetector(1)
    jobs[short.job_id] = short

    fresh = Job("fresh", window=10)  # connected, nothing merged yet
    open_stream(fresh, 0)
    jobs[fresh.job_id] = fresh
    return jobs


def previous_families(jobs, rejected, version, phase_layers, max_series, nonfinite):
    """The metric families of the previous exporter (prometheus_client objects), in its order."""

    def fold(names, values, additive):
        keep = max_series - 1 if len(names) > max_series else len(names)
        yield from zip(names[:keep], (float(v) for v in values[:keep]), strict=True)
        if keep < len(names):
            yield OTHER, float(sum(float(v) for v in values[keep:])) if additive else float("nan")

    jobs = list(jobs.values())
    info = InfoMetricFamily("thermoscope_collector", "The Thermoscope collector.")
    info.add_metric([], {"version": version})
    yield info
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
    yield from (connected, stale, lost, paused)
    received = CounterMetricFamily(
        "thermoscope_frames_received", "Frames accepted for the job.", labels=["job_id"]
    )
    duplicate = CounterMetricFamily(
        "thermoscope_frames_duplicate",
        "Frames replayed after a reconnect that the job had already applied: acknowledged, not applied.",
        labels=["job_id"],
    )
    for job in jobs:
        received.add_metric([job.job_id], job.frames_received)
        duplicate.add_metric([job.job_id], job.frames_duplicate)
    yield from (received, duplicate)
    refused = CounterMetricFamily(
        "thermoscope_frames_rejected", "Messages refused, by reason.", labels=["reason"]
    )
    for reason, count in sorted(rejected.items()):
        refused.add_metric([reason], count)
    yield refused
    bad = CounterMetricFamily(
        "thermoscope_nonfinite_values",
        "NaN/Inf values agents sent, by what carried them (energy, wall_time, layer, site): "
        "counted, never merged (the layer or site is NaN at that step).",
        labels=["job_id", "what"],
    )
    for (job_id, what), count in sorted(nonfinite.items()):
        bad.add_metric([job_id, what], count)
    yield bad

    readings = [(job.job_id, job.reading) for job in jobs if job.reading is not None]
    for name, attr, doc in JOB_GAUGES:
        family = GaugeMetricFamily(name, doc, labels=["job_id"])
        for job_id, r in readings:
            family.add_metric([job_id], float(getattr(r, attr)))
        yield family
    for (name, attr, doc), which in [*((g, "layer") for g in LAYER_GAUGES), (SITE_GAUGE, "site")]:
        family = GaugeMetricFamily(name, doc, labels=["job_id", which])
        for job_id, r in readings:
            for label, value in fold(list(getattr(r, f"{which}_names")), getattr(r, attr), attr in ADDITIVE):
                family.add_metric([job_id, label], value)
        yield family
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
            over = len(names) - (max_series - 1)
            family.add_metric([job_id], float(over if len(names) > max_series else 0))
    yield from (folded_layers, folded_sites)
    engines = InfoMetricFamily(
        "thermoscope_engine",
        "Engine type of the activation site by its scale probe: A scale-invariant, B temperature-dependent.",
        labels=["job_id", "site"],
    )
    network = InfoMetricFamily(
        "thermoscope_network_engine",
        "Engine type of the network: A when all its sites are.",
        labels=["job_id"],
    )
    for job_id, r in readings:
        for name, engine in list(zip(r.site_names, r.site_engine, strict=True))[:max_series]:
            if engine:
                engines.add_metric([job_id, name], {"engine": str(engine)})
        if r.engine:
            network.add_metric([job_id], {"engine": r.engine})
    yield from (engines, network)
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
        names = job.reading.layer_names if job.reading is not None else ()
        scopes = [("job", "", detector.job_phase)]
        scopes += [
            ("layer", n, p) for n, p in zip(names, detector.layer_phases()[:phase_layers], strict=False)
        ]
        for scope, layer, current in scopes:
            for name in PHASES:
                phase.add_metric([job.job_id, scope, layer, name], float(name == current))
        counts = dict(job.transitions)
        for before, after in TRANSITIONS:
            transitions.add_metric([job.job_id, before, after], counts.get((before, after), 0))
        if job.last_transition_time is not None:
            last.add_metric([job.job_id], job.last_transition_time)
    yield from (phase, transitions, last)


def parsed(body: bytes) -> list[tuple]:
    """(name, type, help, samples) per family; values by repr, so NaN equals NaN."""
    return [
        (
            family.name,
            family.type,
            family.documentation,
            [(s.name, s.labels, repr(s.value)) for s in family.samples],
        )
        for family in text_string_to_metric_families(body.decode())
    ]


@pytest.mark.parametrize("max_series", [4, 2, 2_000])
def test_the_body_has_the_previous_exporters_families_and_samples(max_series: int) -> None:
    jobs = jobs_of_every_kind()
    rejected = Counter({"too_large": 2, 'odd "reason"\\': 1})
    nonfinite = {(WEIRD, "layer"): 4, ("merged", "energy"): 1}
    exporter = MetricsExporter(jobs, rejected, "0.1.0", 3, max_series=max_series, nonfinite=nonfinite)

    class Previous:
        def collect(self):
            return previous_families(jobs, rejected, "0.1.0", 3, max_series, nonfinite)

    registry = CollectorRegistry()
    registry.register(Previous())
    body = b"".join(exporter.render())
    assert parsed(body) == parsed(generate_latest(registry))
    assert body.count(b"# HELP ") == body.count(b"# TYPE ") == len(parsed(body)) == 30  # one per family
    # the escaped label values, written once per label set and not read as %-format directives
    assert b'thermoscope_layer_work{job_id="we\\"ird\\\\job\\nwith %s and \xc3\xa9",layer="l\\"%d1"} ' in body
    assert b"+Inf\n" in body and b"-Inf\n" in body and b"NaN\n" in body
    assert b'\nthermoscope_phase{job_id="short",layer="",phase="type_i",scope="job"} 1.0\n' in body  # sorted


def test_the_label_cache_follows_a_jobs_layer_names() -> None:
    jobs = {"j": Job("j", window=10)}
    jobs["j"].reading = reading(["a", "b"], ["s"])
    exporter = MetricsExporter(jobs, {}, "0.1.0")
    first = b"".join(exporter.render())
    assert b'layer="b"' in first and b'layer="c"' not in first
    jobs["j"].reading = reading(["a", "c"], ["s"], step=8)
    second = b"".join(exporter.render())
    assert b'layer="c"' in second and b'layer="b"' not in second
    assert b'thermoscope_last_step{job_id="j"} 8.0\n' in second


def test_name_filter_renders_only_the_named_families() -> None:
    jobs = jobs_of_every_kind()
    process = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=process)
    exporter = MetricsExporter(jobs, {}, "0.1.0", 3, max_series=4, extra=process)
    named = {"thermoscope_last_step", "thermoscope_frames_received_total", "process_open_fds"}
    body = b"".join(exporter.render(named | {"thermoscope_frames_rejected_total", "no_such_family"}))
    # a named family without samples (no reason was rejected) is left out, as prometheus_client does
    assert {f[0] for f in parsed(body)} == {
        "thermoscope_last_step",
        "thermoscope_frames_received",
        "process_open_fds",
    }
    full = b"".join(exporter.render())
    assert b"process_cpu_seconds_total" in full and b"process_cpu_seconds_total" not in body

    # the other families are not rendered at all: readings without layer columns, liveness that fails
    for job in jobs.values():
        if job.reading is not None:
            job.reading = SimpleNamespace(layer_names=job.reading.layer_names, site_names=(), step=9)
        job.liveness = None  # type: ignore[method-assign]
    body = b"".join(exporter.render({"thermoscope_last_step"}))
    assert parsed(body)[0][3] == [
        ("thermoscope_last_step", {"job_id": job_id}, "9.0") for job_id in ("merged", WEIRD, "short")
    ]
    with pytest.raises((AttributeError, TypeError)):
        exporter.render()


def test_metrics_endpoint_serves_text_format_with_name_filter(collector) -> None:
    assert stream(collector.grpc_target, [hello("web"), frame(1, 0), frame(2, 1)])[1] is None
    deadline = time.monotonic() + 10
    url = collector.metrics_url
    while b'thermoscope_last_step{job_id="web"} 1.0' not in urllib.request.urlopen(url, timeout=5).read():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    request = urllib.request.Request(
        url, headers={"Accept-Encoding": "gzip", "Accept": "application/openmetrics-text"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        body = resp.read()
        assert resp.headers["Content-Type"] == CONTENT_TYPE
        assert resp.headers.get("Content-Encoding") is None
        assert int(resp.headers["Content-Length"]) == len(body)
    assert b"process_resident_memory_bytes" in body and b"thermoscope_layer_work{" in body
    with urllib.request.urlopen(
        f"{url}?name[]=thermoscope_last_step&name[]=thermoscope_job_paused", timeout=5
    ) as resp:
        assert {f[0] for f in parsed(resp.read())} == {"thermoscope_last_step", "thermoscope_job_paused"}
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=5)
    assert refused.value.code == 405


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus")
def test_a_body_with_escaping_folding_and_nonfinite_values_passes_promtool() -> None:
    process = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=process)
    exporter = MetricsExporter(
        jobs_of_every_kind(), Counter({"too_large": 1}), "0.1.0", 3, max_series=4, extra=process
    )
    body = b"".join(exporter.render())
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
