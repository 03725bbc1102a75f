"""One job of many ranks: the collector's CPU per merged step, flat (every rank's frame) against
node aggregators (one pre-merged frame per node), in one process (docs/ray.md).

Per merged step, the flat arm parses and decodes every rank's frame and merges them; the node
arm parses and decodes every node's frame and merges the nodes (both as the job does:
`merge.JobMerge`). Beside it, what one node's aggregator spends on its own ranks. The
gRPC and asyncio cost per frame comes on top and is per frame, so it shrinks by the node size
as well. The arms run interleaved, in rotated order, on the same frames.

    python tests/bench/bench_aggregate.py [--nodes 512] [--ranks 8] [--layers 300] [--shards 1|8] [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from thermoscope.collector.merge import JobMerge, Merger, Target
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats, Table
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec
from thermoscope.wire.node import decode_node, encode_node

BINS = 8
SITES = [SiteInfo(f"blocks.{j}.act", "GELU") for j in range(24)]


def rank_table(rank: int, layers: int, shards: int) -> list[LayerInfo]:
    return [
        LayerInfo(f"l{j}", (shards, 64), 64, "float32", rank % shards, shards, -1.0, 1.0)
        for j in range(layers)
    ]


def sample(rng: np.random.Generator, step: int, layers: int) -> Sample:
    n = len(SITES)
    return Sample(
        step,
        1.7e9 + step,
        float(rng.normal()),
        LayerStats(
            rng.integers(1, 1000, layers),
            rng.normal(size=layers),
            rng.uniform(1, 2, layers),
            rng.normal(size=layers),
            rng.normal(size=layers),
            None,
        ),
        SiteStats(rng.integers(1, 99, n), *rng.uniform(1, 2, (4, n)), np.full(n, -1.0)),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=512)
    p.add_argument("--ranks", type=int, default=8, help="ranks per node")
    p.add_argument("--layers", type=int, default=300)
    p.add_argument("--shards", type=int, default=1, help="1: data parallel; 8: HSDP within a node")
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    world, rng = a.nodes * a.ranks, np.random.default_rng(0)
    tables = {r: rank_table(r, a.layers, a.shards) for r in range(world)}
    rank_tables = {r: Table.of_rank(t, SITES) for r, t in tables.items()}
    names = [f"l{j}" for j in range(a.layers)]
    site_names = [s.name for s in SITES]
    flat_tables = {r: (t, SITES) for r, t in tables.items()}
    nodes = {n * a.ranks: list(range(n * a.ranks, (n + 1) * a.ranks)) for n in range(a.nodes)}
    node_tables = {k: Table.of_node({r: rank_tables[r] for r in rs}) for k, rs in nodes.items()}
    node_mergers = {k: Merger(Target.runs(node_tables[k])) for k in nodes}
    node_bound = {k: (list(t.layers), list(t.sites)) for k, t in node_tables.items()}
    node_spans = {k: (tuple(nodes[k]), t.spans) for k, t in node_tables.items()}
    flat_job, node_job = JobMerge(), JobMerge()
    costs: dict[str, list[float]] = {"flat": [], "node": [], "aggregator": []}
    for step in range(a.steps):
        parts = {r: sample(rng, step, a.layers) for r in range(world)}
        rank_bytes = [codec.encode(parts[r], step + 1).frame.SerializeToString() for r in range(world)]
        t0 = time.process_time()
        node_frames = {}
        for k, rs in nodes.items():
            merged, n = node_mergers[k].merge(step, {r: parts[r] for r in rs}, rank_tables)
            node_frames[k] = encode_node(merged, step + 1, n, rs).frame.SerializeToString()
        costs["aggregator"].append((time.process_time() - t0) / a.nodes)

        def flat_arm(step: int = step, rank_bytes: list[bytes] = rank_bytes) -> None:
            decoded = {}
            for r, raw in enumerate(rank_bytes):
                decoded[r] = codec.decode(pb.Frame.FromString(raw), a.layers, len(SITES), BINS)
            flat_job.merge(step, decoded, flat_tables, names, site_names)

        def node_arm(step: int = step, node_frames: dict[int, bytes] = node_frames) -> None:
            decoded, weights = {}, {}
            for k, raw in node_frames.items():
                decoded[k], weights[k], _ = decode_node(
                    pb.Frame.FromString(raw), tuple(nodes[k]), node_tables[k], BINS
                )
            node_job.merge(step, decoded, node_bound, names, site_names, node_spans, weights)

        for name, arm in (("flat", flat_arm), ("node", node_arm))[:: 1 if step % 2 else -1]:
            t0 = time.process_time()
            arm()
            costs[name].append(time.process_time() - t0)
    layer_samples = world * a.layers
    print(
        f"{a.nodes} nodes x {a.ranks} ranks x {a.layers} layers (shards {a.shards}), {a.steps} steps, median"
    )
    print("| arm | CPU ms per merged step | frames per step | layer-samples/s per core |")
    print("|---|---:|---:|---:|")
    for name, frames in (("flat", world), ("node", a.nodes)):
        ms = 1e3 * float(np.median(costs[name]))
        print(f"| {name} | {ms:.1f} | {frames} | {layer_samples / (ms / 1e3):,.0f} |")
    agg_ms = 1e3 * float(np.median(costs["aggregator"]))
    print(f"| one node's aggregator | {agg_ms:.2f} | {a.ranks} in, 1 out | |")


if __name__ == "__main__":
    main()
