"""The wire contract: committed stubs match the .proto, samples survive the trip, and a node
aggregator's hello and frames that break it are refused."""

from __future__ import annotations

import filecmp
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from thermoscope.wire import codec, node

from helpers.nodes import nodes_of, rank_sample
from helpers.protocol import BINS, sample

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_are_what_the_proto_generates(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        from generate import generate
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    committed = ROOT / "proto" / "thermoscope" / "v1"
    for name in ("telemetry_pb2.py", "telemetry_pb2.pyi", "telemetry_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "thermoscope" / "v1" / name, committed / name, shallow=False), (
            f"{name} drifted from telemetry.proto: run `python proto/generate.py`"
        )


def test_a_sample_round_trips_exactly_through_a_frame() -> None:
    s = sample(42, n_layers=3, n_sites=2, energy=0.25)
    msg = codec.encode(s, seq=7)
    back = codec.decode(type(msg.frame).FromString(msg.frame.SerializeToString()), 3, 2, BINS)
    assert msg.frame.seq == 7 and back.step == 42 and back.energy == 0.25
    for field in ("count", "mean", "m2", "dot_before", "dot_after", "histogram"):
        np.testing.assert_array_equal(getattr(back.layers, field), getattr(s.layers, field))
    for field in ("count", "in_mean", "in_m2", "out_mean", "out_m2", "probe_spread"):
        np.testing.assert_array_equal(getattr(back.sites, field), getattr(s.sites, field))


def test_a_frame_without_energy_decodes_to_nan() -> None:
    msg = codec.encode(sample(1, energy=math.nan), seq=1)
    assert not msg.frame.HasField("energy")
    assert math.isnan(codec.decode(msg.frame, 2, 1, BINS).energy)


def test_columns_are_little_endian_bytes_not_repeated_fields() -> None:
    msg = codec.encode(sample(1, n_layers=1000), seq=1)
    assert len(msg.frame.layers.mean) == 8 * 1000
    assert np.frombuffer(msg.frame.layers.count, dtype="<i8")[0] == 100


def test_negative_counts_are_refused() -> None:
    msg = codec.encode(sample(1), seq=1)
    msg.frame.layers.count = np.array([-1, 5], dtype="<i8").tobytes()
    with pytest.raises(codec.WireError) as info:
        codec.decode(msg.frame, 2, 1, BINS)
    assert info.value.reason == "invalid_value"


def test_a_frame_without_a_histogram_decodes_to_none() -> None:
    s = sample(3)
    no_hist = type(s)(s.step, s.wall_time, s.energy, replace(s.layers, histogram=None), s.sites)
    msg = codec.encode(no_hist, seq=1)
    assert msg.frame.layers.histogram == b""
    assert codec.decode(msg.frame, 2, 1, BINS).layers.histogram is None


def test_a_node_frame_round_trips_with_its_ranks_and_energy_weight() -> None:
    n = nodes_of("j", shards=8)[0]  # ranks 0-7
    rng = np.random.default_rng(0)
    msg = n.frame(3, 0, {r: rank_sample(rng, 0, energy=r != 5) for r in range(8)})
    ranks, table = node.decode_node_hello(n.hello.hello)
    assert ranks == tuple(range(8)) and table == n.table
    back, weight, merged = node.decode_node(msg.frame, ranks, table, BINS)
    assert (back.step, weight, merged) == (0, 7, tuple(range(8)))


def test_a_node_hello_with_overlapping_runs_is_refused() -> None:
    hello = nodes_of("j", shards=8)[0].hello.hello
    hello.layers.append(hello.layers[2])  # shards 0..7 of sh0 a second time
    with pytest.raises(codec.WireError, match="overlap"):
        node.decode_node_hello(hello)


def test_a_node_hello_whose_ranks_do_not_start_at_its_rank_is_refused() -> None:
    hello = nodes_of("j", shards=1)[0].hello.hello
    hello.rank = 3
    with pytest.raises(codec.WireError, match="increasing from rank 3"):
        node.decode_node_hello(hello)


def test_a_node_frame_naming_a_rank_outside_its_hello_is_refused() -> None:
    n = nodes_of("j", shards=1)[0]
    msg = n.frame(1, 0, {r: rank_sample(np.random.default_rng(5), 0) for r in range(8)})
    msg.frame.ranks.append(9)
    with pytest.raises(codec.WireError, match="not the hello's"):
        node.decode_node(msg.frame, tuple(range(8)), n.table, BINS)


def test_a_sites_function_travels_in_the_hello_and_an_earlier_agents_reads_as_unsaid() -> None:
    """Site.function is additive: an agent of this release says it, one of an earlier release
    (no field 3) decodes as "" (not said)."""
    from thermoscope.science.stats import LayerInfo, SiteInfo
    from thermoscope.v1 import telemetry_pb2 as pb

    layers = [LayerInfo("w", (2,), 2, "float32")]
    sites = [
        SiteInfo("act", "LeakyReLU", "LeakyReLU(negative_slope=0.2)"),
        SiteInfo(":gelu", "gelu()", "gelu()"),
    ]
    msg = codec.hello(
        job_id="j", run_id="r", rank=0, world_size=1, host="h", agent_version="0", every=1,
        layers=layers, sites=sites, bins=BINS,
    )  # fmt: skip
    assert codec.decode_hello(msg.hello)[1] == sites
    earlier = pb.Hello.FromString(msg.hello.SerializeToString())
    for site in earlier.sites:
        site.ClearField("function")
    assert codec.decode_hello(earlier)[1] == [SiteInfo("act", "LeakyReLU"), SiteInfo(":gelu", "gelu()")]
