"""The wire contract: committed stubs match the .proto, and samples survive the trip."""

from __future__ import annotations

import filecmp
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from thermoscope.wire import codec

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
