"""A job of simulated nodes: each rank's tables and random samples, its raw hello, what a node
aggregator sends for a node's ranks (`thermoscope.cli.raw_protocol.Node`), and the comparison
of two readings to 1e-9 (`test_node_streams.py`, `test_aggregator.py`).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from thermoscope.cli.raw_protocol import Node, site_table
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteStats, Table
from thermoscope.v1 import telemetry_pb2 as pb

from .protocol import AGENT, BINS, RUN, hello

SITES = site_table(2)
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
    return hello(job, n_sites=len(SITES), rank=rank, world_size=WORLD, layers=rank_layers(rank, shards))


def nodes_of(job: str, shards: int) -> list[Node]:
    """What the job's node aggregators send, one per NODE consecutive ranks: a hello, and one
    merged frame per step."""
    nodes = []
    for first in range(0, WORLD, NODE):
        tables = {r: Table.of_rank(rank_layers(r, shards), SITES) for r in range(first, first + NODE)}
        nodes.append(Node(job, tables, WORLD, name=f"node{first}", run=RUN, agent=AGENT))
    return nodes


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
