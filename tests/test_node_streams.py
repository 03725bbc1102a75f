"""The collector takes node aggregators' streams (docs/ray.md, "One job of thousands of ranks"):
a job whose nodes each send one pre-merged frame per step reads what the same ranks streaming
one frame each read, to 1e-9; liveness stays per rank; the job waits for the ranks of a node
that has not connected; a node frame that breaks its hello is refused and changes nothing.

Real collector on loopback, raw-protocol streams (no Monitor, no aggregator process: the node
frames are built as `collector/node/aggregator.py` builds them: `cli.raw_protocol.Node`).
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from thermoscope.collector.service import Collector
from thermoscope.wire import codec

from helpers.nodes import NODE, STEPS, WORLD, assert_readings_equal, nodes_of, rank_hello, rank_sample
from helpers.protocol import OpenStream


@pytest.mark.parametrize("shards", [1, 8, 16])  # data parallel, HSDP within a node, shards over 2 nodes
def test_a_job_of_node_streams_reads_what_its_ranks_streaming_flat_read(collector: Collector, shards: int):
    rng = np.random.default_rng(shards)
    flat = {r: OpenStream(collector.grpc_target, rank_hello("flat", r, shards)) for r in range(WORLD)}
    nodes = nodes_of("nodes", shards)
    node_streams = [OpenStream(collector.grpc_target, node.hello) for node in nodes]
    readings: dict[str, list] = {"flat": [], "nodes": []}
    for step in range(STEPS):
        parts = {r: rank_sample(rng, step, energy=r % 3 != 1) for r in range(WORLD)}
        for r, s in flat.items():
            assert s.ack(codec.encode(parts[r], step + 1)) == step + 1
        for node, s in zip(nodes, node_streams, strict=True):
            assert s.ack(node.frame(step + 1, step, parts)) == step + 1
        for job in readings:
            assert collector.jobs[job].merged_step == step
            readings[job].append(collector.jobs[job].reading)
    for have, want in zip(readings["nodes"], readings["flat"], strict=True):
        assert np.isfinite(have.layer_entropy).all()
        assert_readings_equal(have, want)
    for s in [*flat.values(), *node_streams]:
        s.close()


def test_each_rank_a_node_frame_names_is_heard_and_one_it_leaves_out_goes_stale(tmp_path):
    rng = np.random.default_rng(1)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "e.db", stale_after=0.5).running() as c:
        node = nodes_of("j", 1)[0]  # ranks 0 .. NODE - 1
        s = OpenStream(c.grpc_target, node.hello)
        live = c.jobs["j"].liveness()
        assert sorted(live.ranks) == list(range(NODE)) and live.connected == NODE
        seq, silent = 0, 3
        while True:  # rank 3 has stopped sending: its node's frames merge the other seven
            seq += 1
            parts = {r: rank_sample(rng, seq) for r in range(NODE) if r != silent}
            assert s.ack(node.frame(seq, seq, parts)) == seq
            live = c.jobs["j"].liveness()
            if live.ranks[silent][1]:
                break
            time.sleep(0.1)
        assert [r for r, (_, stale) in live.ranks.items() if stale] == [silent]
        assert live.connected == NODE - 1 and live.lost_total == 1
        s.cancel()  # the node's stream breaks: every one of its ranks is lost
        deadline = time.monotonic() + 15
        while c.jobs["j"].open_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        live = c.jobs["j"].liveness()
        assert sorted(live.ranks) == list(range(NODE)) and all(stale for _, stale in live.ranks.values())
        assert live.connected == 0 and live.lost_total == NODE


def test_the_job_waits_for_the_ranks_of_a_node_not_yet_connected(collector: Collector):
    rng = np.random.default_rng(2)
    first, second = nodes_of("j", 1)
    a = OpenStream(collector.grpc_target, first.hello)
    parts = {r: rank_sample(rng, 0) for r in range(WORLD)}
    assert a.ack(first.frame(1, 0, parts)) == 1
    assert collector.jobs["j"].merged_step == -1  # ranks 8..15 announced, not connected
    b = OpenStream(collector.grpc_target, second.hello)
    assert b.ack(second.frame(1, 0, parts)) == 1
    assert collector.jobs["j"].merged_step == 0
    a.close()
    b.close()


def test_a_node_frame_naming_a_rank_outside_its_hello_is_refused_and_changes_nothing(collector: Collector):
    rng = np.random.default_rng(3)
    node = nodes_of("j", 1)[0]
    s = OpenStream(collector.grpc_target, node.hello)
    parts = {r: rank_sample(rng, 0) for r in range(WORLD)}
    bad = node.frame(1, 0, parts)
    bad.frame.ranks.append(12)  # a rank of the other node
    s.send(bad)
    with pytest.raises(EOFError):
        s.reply()
    assert s._call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not the hello's" in s._call.details()
    assert collector.jobs["j"].frames_received == 0
    assert collector.telemetry.rejected["invalid_value"] == 1
