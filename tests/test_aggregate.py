"""A node aggregator's pre-merge is exact: merging each node's ranks into one node frame, sending
it through the wire form, and merging the nodes as the collector does gives what the flat merge
of every rank gives (`merge.JobMerge` over the ranks), to 1e-9, for data parallel,
sharded-within-node, sharded-across-nodes and unevenly sharded jobs, and so do the readings
derived from it. No Ray needed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from thermoscope.collector.merge import JobMerge, Merger, Target
from thermoscope.science.derive import Thermometer
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats, Table
from thermoscope.wire.node import decode_node, decode_node_hello, encode_node, node_hello

from helpers.nodes import assert_readings_equal

BINS = 6
N_LAYERS = 5
SITES = [SiteInfo(f"act{j}", "ReLU") for j in range(3)]
STEPS = 4


def layout(world: int, shards: int) -> dict[int, list[LayerInfo]]:
    """Each rank's layer table: layers 0-1 replicas, layers 2.. sharded `shards` ways, rank r
    holding shard r % shards (shards == world: FSDP over the world; < node size: HSDP)."""
    tables = {}
    for r in range(world):
        layers = [LayerInfo(f"rep{j}", (4, 4), 16, "float32", 0, 1, -2.0, 2.0) for j in range(2)]
        layers += [
            LayerInfo(f"sh{j}", (shards, 3), 3, "float32", r % shards, shards, -2.0, 2.0)
            for j in range(N_LAYERS - 2)
        ]
        tables[r] = layers
    return tables


def rank_sample(rng: np.random.Generator, step: int, n_layers: int, hist: bool, energy: bool) -> Sample:
    """A rank's sample with random statistics (replicas differ too, so the copy read matters)."""
    count = rng.integers(1, 50, n_layers)
    layers = LayerStats(
        count=count,
        mean=rng.normal(size=n_layers),
        m2=rng.uniform(0.1, 5.0, n_layers),
        dot_before=rng.normal(size=n_layers),
        dot_after=rng.normal(size=n_layers),
        histogram=rng.integers(0, 9, (n_layers, BINS + 2)) if hist else None,
    )
    n = len(SITES)
    sites = SiteStats(
        rng.integers(1, 100, n),
        rng.normal(size=n),
        rng.uniform(0.1, 3.0, n),
        rng.normal(size=n),
        rng.uniform(0.1, 3.0, n),
        np.where(rng.uniform(size=n) < 0.5, -1.0, rng.uniform(size=n)),
    )
    e = float(rng.normal(2.0)) if energy else math.nan
    return Sample(step, 1.7e9 + step + rng.uniform(), e, layers, sites)


def through_nodes(step, parts, tables, node_size, world):
    """Each node's ranks pre-merged, sent and decoded as node frames, then the nodes merged as the
    collector merges them (every node bound, those without a rank in `parts` silent at the step);
    and the job's layers and sites (as its first bound entries name them)."""
    bound, nodes, node_parts, weights = {}, {}, {}, {}
    for first in range(0, world, node_size):
        ranks = [r for r in range(first, min(first + node_size, world))]
        rank_tables = {r: Table.of_rank(tables[r], SITES) for r in ranks}
        nt = Table.of_node(rank_tables)
        hello = node_hello(
            job_id="j",
            run_id="r",
            ranks=ranks,
            world_size=world,
            host="h",
            agent_version="t",
            node=f"n{first}",
            every=1,
            table=nt,
            bins=BINS,
        ).hello
        hello_ranks, decoded_table = decode_node_hello(hello)
        assert decoded_table == nt
        bound[first] = (list(decoded_table.layers), list(decoded_table.sites))
        nodes[first] = (hello_ranks, decoded_table.spans)
        mine = {r: parts[r] for r in ranks if r in parts}
        if not mine:
            continue
        merged, energy_ranks = Merger(Target.runs(nt)).merge(step, mine, rank_tables)
        frame = encode_node(merged, step + 1, energy_ranks, sorted(mine)).frame
        node_parts[first], weights[first], _ = decode_node(frame, hello_ranks, decoded_table, BINS)
    layers: dict[str, LayerInfo] = {}
    for node_layers, _ in bound.values():
        for layer in node_layers:
            layers.setdefault(layer.name, layer)
    merged = JobMerge().merge(step, node_parts, bound, layers, [s.name for s in SITES], nodes, weights)
    return merged, (list(layers.values()), SITES)


def flat(step, parts, tables):
    layer_names = list(dict.fromkeys(layer.name for r in sorted(tables) for layer in tables[r]))
    site_names = [s.name for s in SITES]
    return JobMerge().merge(step, parts, {r: (t, SITES) for r, t in tables.items()}, layer_names, site_names)


def assert_same(a: Sample, b: Sample) -> None:
    for field in ("count", "mean", "m2", "dot_before", "dot_after"):
        np.testing.assert_allclose(getattr(a.layers, field), getattr(b.layers, field), rtol=1e-9, atol=1e-12)
    if a.layers.histogram is None:
        assert b.layers.histogram is None
    else:
        np.testing.assert_array_equal(a.layers.histogram, b.layers.histogram)
    for field in ("count", "in_mean", "in_m2", "out_mean", "out_m2", "probe_spread"):
        np.testing.assert_allclose(getattr(a.sites, field), getattr(b.sites, field), rtol=1e-9, atol=1e-12)
    assert a.energy == pytest.approx(b.energy, rel=1e-12, nan_ok=True)
    assert a.wall_time == b.wall_time


@pytest.mark.parametrize(
    ("world", "node_size", "shards"),
    [
        (32, 8, 1),  # data parallel: every layer a replica on every rank
        (32, 8, 8),  # HSDP: each node holds every shard, nodes replicate
        (32, 8, 16),  # shards span two nodes, pairs of nodes replicate
        (32, 8, 32),  # FSDP over the whole world: every node holds a run of shards
        (20, 8, 12),  # uneven: a node holds two runs, the last node fewer ranks
        (24, 8, 6),  # a shard group does not divide a node
    ],
)
def test_node_merge_equals_the_flat_merge_of_every_rank(world, node_size, shards):
    rng = np.random.default_rng(world * 100 + shards)
    tables = layout(world, shards)
    flat_th = node_th = None
    for step in range(STEPS):
        parts = {r: rank_sample(rng, step, N_LAYERS, hist=step % 2 == 0, energy=r % 3 != 1) for r in tables}
        expected = flat(step, parts, tables)
        got, (job_layers, job_sites) = through_nodes(step, parts, tables, node_size, world)
        assert [layer.name for layer in job_layers] == list(dict.fromkeys(la.name for la in tables[0]))
        assert np.isfinite(got.layers.mean).all()  # every layer's shards are covered
        assert_same(got, expected)
        if flat_th is None:
            flat_th, node_th = (
                Thermometer(job_layers, job_sites, window=3),
                Thermometer(job_layers, job_sites, window=3),
            )
        assert_readings_equal(node_th.update(got), flat_th.update(expected))


def test_energy_stays_the_mean_over_ranks_when_nodes_differ_in_size():
    """A node of 8 ranks and one of 2: averaging node means would weigh each rank of the small
    node four times; weighing nodes by their ranks gives the ranks' mean."""
    rng = np.random.default_rng(3)
    tables = layout(10, 1)
    parts = {r: rank_sample(rng, 0, N_LAYERS, hist=False, energy=True) for r in tables}
    got, _ = through_nodes(0, parts, tables, 8, 10)
    assert got.energy == pytest.approx(np.mean([p.energy for p in parts.values()]), rel=1e-12)


def test_a_rank_missing_at_a_step_leaves_its_shards_nan_as_in_the_flat_merge():
    rng = np.random.default_rng(4)
    tables = layout(16, 16)
    parts = {r: rank_sample(rng, 0, N_LAYERS, hist=True, energy=True) for r in tables if r != 5}
    expected = flat(0, parts, {r: tables[r] for r in parts})
    got, _ = through_nodes(0, parts, tables, 8, 16)
    assert np.isnan(got.layers.mean[2:]).all() and np.isfinite(got.layers.mean[:2]).all()
    assert_same(got, expected)


def test_a_layer_only_a_silent_node_holds_reads_empty_as_in_the_flat_merge():
    """A node that sent nothing at a step (its stream ended, or the step was forced out) leaves
    a layer only it holds without values: count 0, as the flat merge of the ranks that sent
    reads it, not NaN (no shard of it was expected at that step)."""
    rng = np.random.default_rng(6)
    tables = layout(16, 1)
    tables[9] = [*tables[9], LayerInfo("only9", (2,), 2, "float32")]
    parts = {r: rank_sample(rng, 0, N_LAYERS, hist=True, energy=True) for r in range(8)}
    expected = flat(0, parts, tables)
    got, _ = through_nodes(0, parts, tables, 8, 16)
    assert got.layers.count[-1] == 0 and got.layers.mean[-1] == 0.0
    assert np.isfinite(got.layers.mean).all()
    assert_same(got, expected)


def test_a_node_holding_a_layers_shards_apart_merges_each_run_as_the_flat_merge_does():
    """Ranks 0-7 hold the even shards of a 16-way layer, ranks 8-15 the odd ones: each node
    sends eight runs of one shard per layer, all kept, all into one row of the job's layer."""
    rng = np.random.default_rng(7)
    tables = {
        r: [
            LayerInfo(f"sh{j}", (16, 3), 3, "float32", 2 * r % 16 + 2 * r // 16, 16, -2.0, 2.0)
            for j in range(2)
        ]
        for r in range(16)
    }
    parts = {r: rank_sample(rng, 0, 2, hist=True, energy=True) for r in tables}
    got, _ = through_nodes(0, parts, tables, 8, 16)
    assert np.isfinite(got.layers.mean).all()
    assert_same(got, flat(0, parts, tables))
