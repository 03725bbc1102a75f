"""What one job's rank tables hold in the collector's memory, while it streams and after it ended.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_tables.py                       # 100 ranks x 10,000 layers, both layouts
    python tests/bench/bench_tables.py --ranks 20 --layers 2000

Each rank says hello through the servicer's own `Intake.open` (as a gRPC stream would) and
sends one frame through `Job.accept` (its tables bind then); then every stream ends. The Python
heap the collector holds (`tracemalloc`, after a garbage collection) is measured before the
hellos, while all ranks stream, and once all have ended: `replica` is data parallel (every rank
declares the same table), `shard` is FSDP-like (every rank holds its own shard of each layer,
so no two tables are equal).
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

import numpy as np
from bench_ingest import tables

from thermoscope.collector.ingest.server import Telemetry
from thermoscope.science.stats import LayerStats, Sample, SiteStats


def sample(layers: int) -> Sample:
    ones = np.ones(layers)
    return Sample(
        step=0,
        wall_time=1.7e9,
        energy=1.0,
        layers=LayerStats(np.full(layers, 1000, dtype=np.int64), ones, ones, ones, ones, None),
        sites=SiteStats(np.array([64]), *(np.ones(1) for _ in range(4)), probe_spread=np.full(1, -1.0)),
    )


def held() -> float:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / 2**20


def measure(ranks: int, layers: int, layout: str) -> tuple[float, float]:
    """MiB held while every rank streams, and after every stream ended (over the baseline)."""
    telemetry = Telemetry({})
    hellos = tables(ranks, layers, 1, layout)  # bench_ingest's: loadgen's hellos
    frame = sample(layers)
    base = held()
    streams = []
    for h in hellos:
        job, stream = telemetry.intake.open(h, tenant="")
        stream.last_seq = 1
        job.accept(stream, frame)
        streams.append((job, stream))
    streaming = held() - base
    for job, stream in streams:
        job.close(stream, clean=True)
    del streams, job, stream
    return streaming, held() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=100)
    ap.add_argument("--layers", type=int, default=10_000)
    args = ap.parse_args()
    tracemalloc.start()
    print(f"one job of {args.ranks} ranks x {args.layers} layers: collector heap over its baseline (MiB)\n")
    print("| layout | while streaming | after every stream ended |")
    print("|---|---:|---:|")
    for layout in ("replica", "shard"):
        print(f"| {layout} | ", end="", flush=True)
        streaming, ended = measure(args.ranks, args.layers, layout)
        print(f"{streaming:.1f} | {ended:.1f} |", flush=True)


if __name__ == "__main__":
    main()
