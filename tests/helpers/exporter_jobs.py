"""Collector jobs built to hit every path of the /metrics rendering, and the parsed form of a body.

Escaping (quotes, backslashes, newlines, `%` and non-ASCII in job, layer and site names),
folding past `max_series`, engines, phases, liveness (a lost rank, a paused job) and jobs
without a reading. Shared by tests/test_export.py and tests/golden/record.py.
"""

from __future__ import annotations

import math

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from thermoscope.collector.exposition.catalogue import LAYER_GAUGES
from thermoscope.collector.state.job import Job
from thermoscope.collector.state.stream import Stream
from thermoscope.science.derive import Reading
from thermoscope.science.detect import PhaseDetector
from thermoscope.science.findings import Finding, Findings
from thermoscope.science.stats import SiteInfo

from helpers.protocol import layer_table, sample

WEIRD = 'we"ird\\job\nwith %s and é'


def reading(layer_names, site_names, *, step=7, engine="A", **arrays) -> Reading:
    n, m = len(layer_names), len(site_names)
    rng = np.random.default_rng(n + m)
    columns = {
        attr: rng.normal(size=n) * 10.0 ** rng.integers(-6, 8, size=n)
        for _, attr, _ in LAYER_GAUGES
        if attr not in arrays and attr != "layer_temperature_stderr"
    }
    columns.update(arrays)
    # a tenth of the temperature: no draw of its own, so the other columns keep their values
    columns.setdefault("layer_temperature_stderr", 0.1 * np.abs(columns["layer_temperature"]))
    return Reading(
        step=step,
        wall_time=1.7e9,
        energy=0.25,
        entropy=-1234.5678,
        beta=math.inf,
        temperature=math.nan,
        temperature_stderr=math.nan,
        efficiency=0.5,
        layer_names=tuple(layer_names),
        site_names=tuple(site_names),
        site_efficiency=rng.random(m),
        site_engine=np.array(["A", "", "B"] * m)[:m],
        site_function=tuple(["ReLU()", "", "GELU(approximate='tanh')"] * m)[:m],
        site_input_scale=np.arange(m) + 0.5,  # no draw: the other columns keep their values
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

    # labels to escape (its run's too: a Ray Train run's name is the user's), more layers and sites
    # than max_series
    weird = Job(WEIRD, window=10, run_id='run "%s"\\ é')
    names = ['l"%d1', "l\\2", "l\n3", "l4", "é5", "l6", "l7"]
    weird.pipeline.reading = reading(
        names,
        ["s1", 's"2', "s3", "s4", "s5"],
        layer_entropy=np.array([1.0, 2.0, 3.0, 0.1, 0.2, 0.3, 1e300]),
        layer_temperature=np.array([-math.inf, math.inf, math.nan, 0.0, -0.0, 5e-324, 1.0]),
        layer_work=np.array([1.0, 2.0, 3.0, math.nan, 1.0, 1.0, 1.0]),
    )
    weird.pipeline.detector = PhaseDetector(len(names))
    weird.pipeline.detector.job = 2
    weird.pipeline.detector.layers[:] = [0, 1, 2, 3, 4, 0, 1]
    weird.pipeline.transitions[("type_i", "transition")] = 2
    weird.pipeline.last_transition_time = 1.7e9 + 0.25
    lost = open_stream(weird, 1)
    open_stream(weird, 0)
    weird.close(lost, clean=False)
    weird.set_paused(True)
    weird.frames_received, weird.frames_duplicate = 12_345_678, 3
    weird.pipeline.findings = findings = Findings()  # more of one finding than max_series: folded
    for k, site in enumerate(["s1", 's"2', "s3", "s4", "s5"]):
        findings.active[("dead_site", "site", site)] = Finding(
            "dead_site", "site", site, 10 + k, 1.7e9, "site_gain", 0.0, 0.9
        )
    findings.active[("exploding_update", "job", "")] = Finding(
        "exploding_update", "job", "", 12, 1.7e9, "update_ratio_decades", 1.5, 0.99
    )
    findings.totals.update({"dead_site": 6, "exploding_update": 1})
    jobs[weird.job_id] = weird

    short = Job("short", window=10)  # a detector with fewer layers than the reading (mid-update)
    short.pipeline.reading = reading(["a", "b", "c"], [], engine="")
    short.pipeline.detector = PhaseDetector(1)
    jobs[short.job_id] = short

    fresh = Job("fresh", window=10)  # connected, nothing merged yet
    open_stream(fresh, 0)
    jobs[fresh.job_id] = fresh
    return jobs


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
