"""`/metrics` rendering: the direct text path writes what prometheus_client wrote before it.

The oracle is the previous exporter's output (a prometheus_client custom collector, as of
c6482c8, rendered by `prometheus_client.generate_latest`), recorded in tests/golden/metrics.json
(tests/golden/record.py says how): the body is parsed and compared family by family (order,
HELP, TYPE) and sample by sample (names, label sets, values with NaN and +-Inf), over jobs built
to hit escaping, folding, engines, phases, liveness and jobs without a reading
(helpers/exporter_jobs.py). The families added since (the temperatures' standard errors, whether
the energy is cumulative work, the run a job shows) and the energy's and temperatures' HELP texts
were recorded from this exporter, the rest left as they were.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, ProcessCollector

from thermoscope.cli import raw_protocol
from thermoscope.collector.exposition.catalogue import FAMILIES
from thermoscope.collector.exposition.export import MetricsExporter
from thermoscope.collector.exposition.writer import CONTENT_TYPE
from thermoscope.collector.state.job import Job
from thermoscope.science.findings import NAMES
from thermoscope.wire.contract import VERSION

from helpers import golden
from helpers.exporter_jobs import WEIRD, jobs_of_every_kind, parsed, reading
from helpers.protocol import frame, hello, stream

#: The version tests/golden/record.py rendered the recorded body with (an input of the golden,
#: not this release's `VERSION`, which the other tests pass).
RECORDED = "0.1.0"
#: Families added after the golden body was recorded.
ADDED = {
    "thermoscope_finding",
    "thermoscope_findings",
    "thermoscope_rank_info",
    "thermoscope_site_info",
}  # (`_total` dropped)


@pytest.mark.parametrize("max_series", [4, 2, 2_000])
def test_the_body_has_the_recorded_families_and_samples_of_the_previous_exporter(max_series: int) -> None:
    jobs = jobs_of_every_kind()
    rejected = Counter({"too_large": 2, 'odd "reason"\\': 1})
    nonfinite = {(WEIRD, "layer"): 4, ("merged", "energy"): 1}
    exporter = MetricsExporter(jobs, rejected, RECORDED, 3, max_series=max_series, nonfinite=nonfinite)
    body = b"".join(exporter.render())
    # as JSON holds it: tuples as lists; the families added since are checked apart (below)
    recorded = [f for f in parsed(body) if f[0] not in ADDED]
    assert json.loads(json.dumps(recorded)) == golden.load_json("metrics")[str(max_series)]
    assert body.count(b"# HELP ") == body.count(b"# TYPE ") == len(parsed(body)) == 42  # one per family
    # the escaped label values, written once per label set and not read as %-format directives
    assert b'thermoscope_layer_work{job_id="we\\"ird\\\\job\\nwith %s and \xc3\xa9",layer="l\\"%d1"} ' in body
    assert b"+Inf\n" in body and b"-Inf\n" in body and b"NaN\n" in body
    assert b'\nthermoscope_phase{job_id="short",layer="",phase="type_i",scope="job"} 1.0\n' in body  # sorted


@pytest.mark.parametrize("max_series", [4, 2_000])
def test_a_finding_holds_as_a_one_per_layer_and_beyond_max_series_folds_into_other(max_series: int) -> None:
    body = b"".join(MetricsExporter(jobs_of_every_kind(), {}, VERSION, max_series=max_series).render())
    held = {
        (labels["finding"], labels["layer"]): float(v)
        for name, labels, v in next(f for f in parsed(body) if f[0] == "thermoscope_finding")[3]
        if labels["job_id"] == WEIRD
    }
    sites = ["s1", 's"2', "s3", "s4", "s5"]
    kept = sites if max_series > 5 else [*sites[: max_series - 1], "__other__"]
    assert held == {("exploding_update", ""): 1.0, **{("dead_site", s): 1.0 for s in kept}}
    totals = {
        labels["finding"]: float(v)
        for name, labels, v in next(f for f in parsed(body) if f[0] == "thermoscope_findings")[3]
        if labels["job_id"] == WEIRD
    }
    assert totals == {**dict.fromkeys(NAMES, 0.0), "dead_site": 6, "exploding_update": 1}


def test_the_catalogue_says_what_each_family_of_the_body_is() -> None:
    """The body lists the catalogue's families in its order, each with its type, help and labels."""
    jobs = jobs_of_every_kind()
    nonfinite = {("merged", "energy"): 1}
    body = b"".join(MetricsExporter(jobs, {"too_large": 2}, VERSION, 3, nonfinite=nonfinite).render())
    families = parsed(body)
    assert [(f.type, f.help) for f in FAMILIES] == [(kind, doc) for _, kind, doc, _ in families]
    for family, (_, _, _, samples) in zip(FAMILIES, families, strict=True):
        assert samples, family.name  # every family has samples here
        assert {name for name, _, _ in samples} == {family.name}
        assert {tuple(sorted(labels)) for _, labels, _ in samples} == {tuple(sorted(family.labels))}


def test_a_job_whose_energy_is_cumulative_work_says_so() -> None:
    jobs = {"loss": Job("loss", window=10), "work": Job("work", window=10)}
    jobs["loss"].pipeline.reading = reading(["a"], [])
    jobs["work"].pipeline.reading = dataclasses.replace(reading(["a"], []), energy_from_work=True)
    body = b"".join(MetricsExporter(jobs, {}, VERSION).render())
    assert b'\nthermoscope_energy_from_work{job_id="loss"} 0.0\n' in body
    assert b'\nthermoscope_energy_from_work{job_id="work"} 1.0\n' in body


def test_the_label_cache_follows_a_jobs_layer_names() -> None:
    jobs = {"j": Job("j", window=10)}
    jobs["j"].pipeline.reading = reading(["a", "b"], ["s"])
    exporter = MetricsExporter(jobs, {}, VERSION)
    first = b"".join(exporter.render())
    assert b'layer="b"' in first and b'layer="c"' not in first
    jobs["j"].pipeline.reading = reading(["a", "c"], ["s"], step=8)
    second = b"".join(exporter.render())
    assert b'layer="c"' in second and b'layer="b"' not in second
    assert b'thermoscope_last_step{job_id="j"} 8.0\n' in second


def test_name_filter_renders_only_the_named_families() -> None:
    jobs = jobs_of_every_kind()
    process = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=process)
    exporter = MetricsExporter(jobs, {}, VERSION, 3, max_series=4, extra=process)
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
            job.pipeline.reading = SimpleNamespace(layer_names=job.reading.layer_names, site_names=(), step=9)
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


def test_a_jobs_run_as_its_agents_name_it_is_an_info_series_so_a_ray_train_run_is_found_by_name(
    collector,
) -> None:
    """A Ray job's id is opaque (`01000000`); its agents name the run after the Train run."""
    train_run = 'ray_train_run-2026-12-08_02-00-00 "x"'  # RunConfig(name=...) is the user's: escaped
    opened = [raw_protocol.hello("01000000", run=train_run, agent="test"), frame(1, 0)]
    assert stream(collector.grpc_target, opened)[1] is None
    assert stream(collector.grpc_target, [hello("unnamed"), frame(1, 0)])[1] is None
    url = f"{collector.metrics_url}?name[]=thermoscope_run_info"
    deadline = time.monotonic() + 30
    while (
        len(samples := [s for f in parsed(urllib.request.urlopen(url, timeout=5).read()) for s in f[3]]) < 2
    ):
        assert time.monotonic() < deadline, samples
        time.sleep(0.05)
    assert ("thermoscope_run_info", {"job_id": "01000000", "run": train_run}, "1.0") in samples
    assert {s[1]["job_id"] for s in samples} == {"01000000", "unnamed"}  # the tests' agents name a run


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus")
def test_a_body_with_escaping_folding_and_nonfinite_values_passes_promtool() -> None:
    process = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=process)
    exporter = MetricsExporter(
        jobs_of_every_kind(), Counter({"too_large": 1}), VERSION, 3, max_series=4, extra=process
    )
    body = b"".join(exporter.render())
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
