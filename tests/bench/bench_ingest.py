"""What the collector's ingest costs per frame and per merged step, in-process, without gRPC.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_ingest.py                          # 4 ranks x 200 layers (loadgen's job)
    python tests/bench/bench_ingest.py --layers 1000 --profile  # plus a cProfile top-15 of Job.accept

The frames are `thermoscope loadgen`'s (cli/raw_protocol.py): layers `layer{i}` of 1,000
float32 values, held whole by every rank (data parallel replicas), one ReLU site, 8 histogram
bins, energy 1.0, the same column values as its template, parsed from the template plus a
(seq, step, wall_time) stamp as a collector receives them. Options move away from it:
`--sites`, `--hist-every` (histograms on every k-th step, as agents send them; loadgen sends
them on every frame), `--layout shard` (every layer split into one shard per rank, as FSDP
does) and `--noise` (a seeded relative perturbation of the moments, so that entropies move
and the detector and thermometer see a learning-like series instead of a constant one).

Stages, each timed over all frames of a run (the best of `--repeat` runs: the machine is
shared, the minimum is the least disturbed figure):

* `parse`: `AgentMessage.FromString` (gRPC's deserializer does it before the servicer);
* `codec.decode`: validation and columns of one frame;
* `Job.accept`: one frame into a `Job` (store=None, as the collector runs without `--db`),
  which on each step's last rank merges the step, runs the thermometer and the detector;
* per merged step, apart: `JobMerge.merge` (as the job calls it), `Thermometer.update` and
  `PhaseDetector.update` on the merged samples;
* below the table, what a checkpoint's encoding of the job's state costs (`schema.encode_state`,
  each changed job at every `--checkpoint-interval`), with no step pending and with 30.

The table gives microseconds per frame or per merged step, and what one core could take if
it did nothing but that stage: frames/s and layer-samples/s (frames x layers per frame).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Callable

import numpy as np

from thermoscope.cli import raw_protocol
from thermoscope.cli.loadgen_agents import NUMEL, RUN
from thermoscope.collector.ingest.server import Telemetry
from thermoscope.collector.merge import JobMerge
from thermoscope.collector.settings import DEFAULTS
from thermoscope.collector.state import schema
from thermoscope.collector.state.checkpoint import values_of
from thermoscope.collector.state.job import Job
from thermoscope.collector.state.stream import Stream
from thermoscope.science.derive import Thermometer
from thermoscope.science.detect import PhaseDetector
from thermoscope.science.stats import LayerStats, Sample
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec

BINS = raw_protocol.BINS
WINDOW = DEFAULTS.window  # the collector's default thermometer window


def tables(ranks: int, layers: int, sites: int, layout: str) -> list[pb.Hello]:
    """Each rank's hello, as loadgen's agents send it (shards: one per rank of every layer)."""
    return [
        raw_protocol.hello(
            "bench",
            n_sites=sites,
            rank=rank,
            world_size=ranks,
            layers=raw_protocol.layer_table(layers, (rank, ranks) if layout == "shard" else (0, 1), NUMEL),
            run=RUN,
            agent=RUN,
        ).hello
        for rank in range(ranks)
    ]


def frames(args: argparse.Namespace) -> list[list[bytes]]:
    """Serialized frames by step, then rank: loadgen's template values and its stamp."""
    rng = np.random.default_rng(0)
    n, ones = args.layers, np.ones(args.layers)
    hist = raw_protocol.histogram(n)
    out = []
    for step in range(1, args.steps + 1):
        drift = 1.0 + 1e-3 * step / args.steps  # a slow, learning-like spread of the values
        row = []
        for _ in range(args.ranks):
            jitter = 1.0 + args.noise * rng.standard_normal((2, n))
            sample = Sample(
                step=0,
                wall_time=0.0,
                energy=1.0 + args.noise * rng.standard_normal() if args.noise else 1.0,
                layers=LayerStats(
                    np.full(n, NUMEL, dtype=np.int64),
                    0.1 * ones * jitter[0],
                    2.0 * ones * (drift if args.noise else 1.0) * np.abs(jitter[1]),
                    0.5 * ones,
                    0.4 * ones,
                    hist if step % args.hist_every == 0 else None,
                ),
                sites=raw_protocol.site_stats(
                    np.full(args.sites, 64, dtype=np.int64), *(np.ones(args.sites) for _ in range(4))
                ),
            )
            template = codec.encode(sample, 1).SerializeToString()
            row.append(template + raw_protocol.stamp(step, step, time.time()))
        out.append(row)
    return out


def new_job(hellos: list[pb.Hello]) -> tuple[Job, list[Stream]]:
    """A job with one open stream per rank, opened by the servicer's own `Intake.open`."""
    telemetry = Telemetry({})  # the default window: WINDOW
    streams = [telemetry.intake.open(h, tenant="")[1] for h in hellos]
    return telemetry.jobs["bench"], streams


def state_seconds(job: Job, repeat: int) -> float:
    """What encoding the job's state for a checkpoint costs (the best of `repeat` runs)."""
    values = values_of(job, schema.STATE)
    return best(repeat, lambda: schema.encode_state(values))


def best(repeat: int, run: Callable[[], None]) -> float:
    """The least wall-clock seconds of `repeat` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4, help="ranks per job (default 4, loadgen's --world-size)")
    p.add_argument("--layers", type=int, default=200, help="layers per rank's frame (default 200)")
    p.add_argument("--sites", type=int, default=1, help="activation sites per frame (default 1)")
    p.add_argument("--steps", type=int, default=300, help="merged steps per run (default 300)")
    p.add_argument("--hist-every", type=int, default=1, help="histograms every k-th step (default 1)")
    p.add_argument("--layout", choices=("replica", "shard"), default="replica", help="default replica")
    p.add_argument("--noise", type=float, default=0.0, help="relative noise on the moments (default 0)")
    p.add_argument("--repeat", type=int, default=3, help="runs per stage; the best is reported")
    p.add_argument("--profile", action="store_true", help="print a cProfile top-15 of Job.accept")
    args = p.parse_args()

    hellos = tables(args.ranks, args.layers, args.sites, args.layout)
    raw = frames(args)
    n_frames, n_steps = args.ranks * args.steps, args.steps
    msgs = [[pb.AgentMessage.FromString(b) for b in row] for row in raw]
    decode = lambda: [  # noqa: E731
        [codec.decode(m.frame, args.layers, args.sites, BINS, {}) for m in row] for row in msgs
    ]
    samples = decode()

    def accept() -> Job:
        job, streams = new_job(hellos)
        for row, srow in zip(msgs, samples, strict=True):
            for s, m, sample in zip(streams, row, srow, strict=True):
                s.last_seq = m.frame.seq
                job.accept(s, sample)
        assert job.merged_step == args.steps, job.merged_step
        return job

    # the per-step parts alone, as the job hands them to its merge (with its plans, kept across steps);
    # the ranks' tables bind with their first frame, so the job is one that took a run's frames
    job = accept()
    declared = job.pipeline.declared
    names = job.layer_names
    parts = [dict(enumerate(srow)) for srow in samples]
    job_merge = JobMerge()

    def merge_one(step: int, ps: dict[int, Sample]) -> Sample:
        return job_merge.merge(
            step, ps, declared.by_rank, declared.layers, declared.sites, declared.nodes, None
        )

    merged = [merge_one(i + 1, ps) for i, ps in enumerate(parts)]

    def merge() -> None:
        for i, ps in enumerate(parts):
            merge_one(i + 1, ps)

    def thermometer() -> None:
        th = Thermometer(list(job.layers.values()), list(job.sites.values()), window=WINDOW)
        for m in merged:
            th.update(m)

    th = Thermometer(list(job.layers.values()), list(job.sites.values()), window=WINDOW)
    readings = [th.update(m) for m in merged]
    per_value = [
        r.layer_entropy / np.maximum(m.layers.count, 1) for r, m in zip(readings, merged, strict=True)
    ]

    def detector() -> None:
        d = PhaseDetector(len(names))
        for r, h in zip(readings, per_value, strict=True):
            d.update(r.step, r.energy, h)

    stages = [
        (
            "parse (protobuf)",
            "frame",
            best(args.repeat, lambda: [pb.AgentMessage.FromString(b) for r in raw for b in r]) / n_frames,
        ),
        ("codec.decode", "frame", best(args.repeat, decode) / n_frames),
        ("Job.accept (merge + thermometer + detector)", "frame", best(args.repeat, accept) / n_frames),
        ("JobMerge.merge", "merged step", best(args.repeat, merge) / n_steps),
        ("Thermometer.update", "merged step", best(args.repeat, thermometer) / n_steps),
        ("PhaseDetector.update", "merged step", best(args.repeat, detector) / n_steps),
    ]
    print(
        f"{args.ranks} ranks x {args.layers} layers ({args.layout}), {args.sites} site(s), "
        f"{BINS} bins, histograms every {args.hist_every} step(s), noise {args.noise:g}, "
        f"{args.steps} steps, best of {args.repeat}\n"
    )
    print("| stage | per | us | frames/s per core | layer-samples/s per core |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, per, seconds in stages:
        fps = (1.0 if per == "frame" else args.ranks) / seconds
        print(f"| {name} | {per} | {seconds * 1e6:,.1f} | {fps:,.0f} | {fps * args.layers:,.0f} |")
    decode_accept = stages[1][2] + stages[2][2]
    print(
        f"| codec.decode + Job.accept | frame | {decode_accept * 1e6:,.1f} | {1 / decode_accept:,.0f} "
        f"| {args.layers / decode_accept:,.0f} |"
    )

    # A checkpoint writes each changed job's state (`Checkpointer._write`) every interval, pending
    # samples included: with no step pending, and with one rank ahead of the others (as the ranks
    # of `loadgen --rate 0` drift apart, each up to 64 frames ahead of its acks).
    ahead, streams = new_job(hellos)
    for row, srow in zip(msgs[: min(30, args.steps)], samples, strict=False):
        streams[0].last_seq = row[0].frame.seq
        ahead.accept(streams[0], srow[0])
    idle, behind = state_seconds(job, args.repeat), state_seconds(ahead, args.repeat)
    print(
        f"\ncheckpoint of the job's state (schema.encode_state): {idle * 1e3:.1f} ms with no step "
        f"pending, {behind * 1e3:.1f} ms with {len(ahead.pipeline.pending)} steps pending (one rank ahead)"
    )

    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(accept)
        print("\ncProfile of Job.accept over one run (top 15 by own time):\n")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
