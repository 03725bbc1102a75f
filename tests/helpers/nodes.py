"""A job of simulated nodes: each rank's tables and random samples, its raw hello, what a node
aggregator sends for a node's ranks (built as `collector/node/aggregator.py` builds it), and the
comparison of two readings to 1e-9 (`test_node_streams.py`, `test_aggregator.py`).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from thermoscope.collector.merge import Merger, Target
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats, Table
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec
from thermoscope.wire.node import encode_node, node_hello

from .protocol import BINS

SITES = [SiteInfo(f"site{j}", "ReLU") for j in range(2)]
WORLD, NODE = 16, 8
STEPS = 5


def rank_layers(rank: int, shards: int) -> list[LayerInfo]:
    """Two replicated layers and three sharded `shards` ways (rank r holds shard r % shards)."""
    layers = [LayerInfo(f"rep{j}", (4, 4), 16, "float32", 0, 1, -2.0, 2.0) for j in range(2)]
    return layers + [
        LayerInfo(f"sh{j}", (shards, 3), 3, "float32", rank % shards, shards, -2.0, 2.0) for j in range(3)
    ]


def rank_sample(rng: np.random.Generator, step: int, energy: bool = True) -> Sample:
    n = 5
    layers = LayerStats(
        count=rng.integers(1, 50, n),
        mean=rng.normal(size=n),
        m2=rng.uniform(0.1, 5.0, n),
        dot_before=rng.normal(size=n),
        dot_after=rng.normal(size=n),
        histogram=rng.integers(0, 9, (n, BINS + 2)) if step % 2 == 0 else None,
    )
    m = len(SITES)
    sites = SiteStats(
        rng.integers(1, 100, m),
        rng.normal(size=m),
        rng.uniform(0.1, 3.0, m),
        rng.normal(size=m),
        rng.uniform(0.1, 3.0, m),
        np.full(m, -1.0),
    )
    return Sample(step, time.time(), float(rng.normal(2.0)) if energy else float("nan"), layers, sites)


def rank_hello(job: str, rank: int, shards: int) -> pb.AgentMessage:
    return codec.hello(
        job_id=job,
        run_id="r1",
        rank=rank,
        world_size=WORLD,
        host="test",
        agent_version="test",
        every=1,
        layers=rank_layers(rank, shards),
        sites=SITES,
        bins=BINS,
    )


class Node:
    """What an aggregator sends for the ranks `ranks`: its hello, and one merged frame per step."""

    def __init__(self, job: str, ranks: list[int], shards: int) -> None:
        self.ranks = ranks
        self.tables = {r: Table.of_rank(rank_layers(r, shards), SITES) for r in ranks}
        self.table = Table.of_node(self.tables)
        self.merger = Merger(Target.runs(self.table))
        self.hello = node_hello(
            job_id=job,
            run_id="r1",
            ranks=ranks,
            world_size=WORLD,
            host="test",
            agent_version="test",
            node=f"node{ranks[0]}",
            every=1,
            table=self.table,
            bins=BINS,
        )

    def frame(self, seq: int, step: int, parts: dict[int, Sample]) -> pb.AgentMessage:
        mine = {r: parts[r] for r in self.ranks if r in parts}
        merged, energy_ranks = self.merger.merge(step, mine, self.tables)
        return encode_node(merged, seq, energy_ranks, sorted(mine))


def nodes_of(job: str, shards: int) -> list[Node]:
    return [Node(job, list(range(first, first + NODE)), shards) for first in range(0, WORLD, NODE)]


def assert_readings_equal(have, want) -> None:
    for field in ("energy", "entropy", "beta", "temperature", "efficiency"):
        assert getattr(have, field) == pytest.approx(getattr(want, field), rel=1e-9, abs=1e-12, nan_ok=True)
    for field in (
        "layer_entropy",
        "layer_work",
        "layer_temperature",
        "layer_histogram_entropy",
        "site_efficiency",
    ):
        np.testing.assert_allclose(getattr(have, field), getattr(want, field), rtol=1e-9, atol=1e-12)
