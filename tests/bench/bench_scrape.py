"""What one `/metrics` scrape costs the collector at a given size, in-process, without HTTP.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_scrape.py                      # 250 jobs x 200 layers: loadgen's 1,000 agents
    python tests/bench/bench_scrape.py --baseline c6482c8   # plus prometheus_client's path at that commit

Jobs are built through the collector's merge path: `--ranks` streams per job (default 4, as
`thermoscope loadgen --world-size`), each rank's samples fed to `Job.accept` for `--steps`
steps, so every job has a reading, a phase detector and its liveness. Layers are `layer{i}`
held whole by every rank, as loadgen declares them; the moments carry a seeded relative noise
so that the readings are full-precision floats (loadgen's identical template values would
format faster than real ones) and temperatures are mostly defined.

Timed, each over `--rounds` rounds (the machine is shared: min and median are given):

* `full`: `MetricsExporter.render()`, the whole body in the chunks the server writes, process
  metrics included;
* `last_step`: `render({"thermoscope_last_step"})`, what `?name[]=thermoscope_last_step` costs
  (the loadgen's latency poller);
* `gzip-1`, `gzip-9`: compressing the full body at level 1, and at level 9, which is what
  prometheus_client's own handler does when the scraper accepts gzip (it always does);
* with `--baseline REV`: `prometheus_client.generate_latest` over the `MetricsExporter` of
  collector/export.py at git commit REV, the per-sample path this module replaced.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from thermoscope.collector.exposition.export import MetricsExporter
from thermoscope.collector.settings import DEFAULTS
from thermoscope.collector.state.job import Job
from thermoscope.collector.state.stream import Stream
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats
from thermoscope.wire.contract import VERSION

BINS = 8
REPO = Path(__file__).resolve().parents[2]


def build_jobs(n_jobs: int, layers: int, sites: int, ranks: int, steps: int) -> dict[str, Job]:
    """`n_jobs` jobs of `ranks` open streams, each fed `steps` steps through `Job.accept`."""
    rng = np.random.default_rng(0)
    table = [LayerInfo(f"layer{i}", (1000,), 1000, "float32") for i in range(layers)]
    site_table = [SiteInfo(f"site{i}", "ReLU") for i in range(sites)]
    hist = np.full((layers, BINS + 2), 10, dtype=np.int64)
    hist[:, [0, -1]] = 0
    jobs = {}
    for j in range(n_jobs):
        job = Job(f"job{j}", window=DEFAULTS.window)
        streams = [
            Stream(
                job_id=job.job_id,
                run_id="bench",
                rank=r,
                world_size=ranks,
                host="bench",
                local_rank=r,
                node="",
                layers=table,
                sites=site_table,
                bins=BINS,
            )
            for r in range(ranks)
        ]
        for s in streams:
            job.open(s)
        for step in range(steps):
            for s in streams:
                jitter = 1.0 + 0.01 * rng.standard_normal((4, layers))
                sample = Sample(
                    step=step,
                    wall_time=time.time(),
                    energy=1.0 / (1 + step) + 0.01 * rng.standard_normal(),
                    layers=LayerStats(
                        np.full(layers, 1000, dtype=np.int64),
                        0.1 * jitter[0],
                        (2.0 - 0.05 * step) * jitter[1],
                        0.5 * jitter[2],
                        0.4 * jitter[3],
                        hist,
                    ),
                    sites=SiteStats(
                        np.full(sites, 64, dtype=np.int64),
                        *(1.0 + 0.1 * rng.random(sites) for _ in range(4)),
                        probe_spread=np.full(sites, -1.0),
                    ),
                )
                s.last_seq = step + 1
                job.accept(s, sample)
        jobs[job.job_id] = job
    return jobs


def baseline_exporter(rev: str, jobs: dict[str, Job]) -> CollectorRegistry:
    """A registry with collector/export.py's `MetricsExporter` as of git commit `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:collector/export.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.replace("from .merge import Job", "from .job import Job")  # where `Job` lives now
    spec = importlib.util.spec_from_loader("thermoscope.collector._export_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    module.__package__ = "thermoscope.collector"  # its relative imports resolve to today's modules
    exec(compile(source, f"{rev}:collector/export.py", "exec"), module.__dict__)
    registry = CollectorRegistry()
    as_before = {job_id: _JobAsBefore(job) for job_id, job in jobs.items()}
    registry.register(module.MetricsExporter(as_before, Counter(), VERSION, 50, nonfinite={}))
    ProcessCollector(registry=registry)
    return registry


class _JobAsBefore:
    """A job as the baseline exporter reads it: with the attributes `Job` had before its ranks
    and pipeline were split out of it."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self.paused = job.ranks.paused
        self.detector = job.pipeline.detector
        self.transitions = job.pipeline.transitions
        self.last_transition_time = job.pipeline.last_transition_time

    def __getattr__(self, name: str) -> object:
        return getattr(self._job, name)


def timed(rounds: int, run: Callable[[], object]) -> tuple[float, float]:
    """(min, median) milliseconds of `rounds` calls."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=250, help="jobs (default 250: 1,000 agents in jobs of 4)")
    p.add_argument("--layers", type=int, default=200, help="layers per job (default 200)")
    p.add_argument("--sites", type=int, default=1, help="activation sites per job (default 1)")
    p.add_argument("--ranks", type=int, default=4, help="ranks per job (default 4)")
    p.add_argument("--steps", type=int, default=4, help="steps fed to each job (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement (default 5)")
    p.add_argument("--baseline", metavar="REV", help="also time prometheus_client's path at git commit REV")
    args = p.parse_args()

    t0 = time.perf_counter()
    jobs = build_jobs(args.jobs, args.layers, args.sites, args.ranks, args.steps)
    built = time.perf_counter() - t0
    process = CollectorRegistry(auto_describe=True)  # as the collector builds it
    ProcessCollector(registry=process)
    exporter = MetricsExporter(jobs, Counter(), VERSION, 50, nonfinite={}, extra=process)
    body = b"".join(exporter.render())  # also fills the label cache, as the first scrape does
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    last = b"".join(exporter.render({"thermoscope_last_step"}))

    rows = []
    if args.baseline:
        registry = baseline_exporter(args.baseline, jobs)
        rows.append(
            (f"prometheus_client at {args.baseline}", timed(args.rounds, lambda: generate_latest(registry)))
        )
    rows += [
        ("full", timed(args.rounds, exporter.render)),
        ("last_step", timed(args.rounds, lambda: exporter.render({"thermoscope_last_step"}))),
        ("gzip-1 of the full body", timed(args.rounds, lambda: gzip.compress(body, compresslevel=1))),
        ("gzip-9 of the full body", timed(args.rounds, lambda: gzip.compress(body, compresslevel=9))),
    ]
    level1, level9 = (len(gzip.compress(body, compresslevel=level)) for level in (1, 9))
    print(
        f"{args.jobs} jobs x {args.layers} layers, {args.sites} site(s), {args.ranks} ranks, "
        f"{args.steps} steps (built in {built:.1f} s); body {samples:,} samples, {len(body) / 2**20:.1f} MiB "
        f"(gzip-1 {level1 / 2**20:.2f} MiB, gzip-9 {level9 / 2**20:.2f} MiB); "
        f"last_step body {len(last):,} bytes; {args.rounds} rounds\n"
    )
    print("| jobs | layers | samples | body MiB | what | min ms | median ms |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for what, (low, mid) in rows:
        print(
            f"| {args.jobs} | {args.layers} | {samples:,} | {len(body) / 2**20:.1f} | {what} "
            f"| {low:,.1f} | {mid:,.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
