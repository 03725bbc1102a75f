"""A node's aggregator, end to end on loopback: raw-protocol rank agents stream to
`thermoscope aggregator` processes (one per simulated node) and those to a real collector; the
collector's readings equal those of the same ranks streaming to it directly, to 1e-9; each rank
is acknowledged (and told its frames are durable) only once the collector acknowledged (and
made durable) the node frame that holds them; a rank that is not one of the node's is refused.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from thermoscope.collector.service import Collector
from thermoscope.collector.state.pipeline import MAX_PENDING_STEPS
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec

from helpers.nodes import NODE, STEPS, WORLD, assert_readings_equal, rank_hello, rank_sample
from helpers.processes import free_port, stop_process
from helpers.protocol import OpenStream, stream


def acks_until(stream: OpenStream, seq: int) -> list[pb.Ack]:
    """The acks the stream gets up to the first that acknowledges `seq` (configs skipped)."""
    acks = []
    while not acks or acks[-1].seq < seq:
        reply = stream.reply(timeout=30)
        if reply.HasField("ack"):
            acks.append(reply.ack)
    return acks


@contextlib.contextmanager
def aggregator(collector: Collector, ranks: int) -> Iterator[str]:
    """`thermoscope aggregator` for `ranks` ranks, as its own process: its loopback address."""
    target = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "thermoscope.cli", "aggregator"),
            *("--collector", collector.grpc_target, "--listen", target, "--ranks", str(ranks)),
        ]
    )
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield target
    finally:
        stop_process(proc)


@pytest.fixture
def aggregators(collector: Collector) -> Iterator[list[str]]:
    """An aggregator for each node of WORLD ranks."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(aggregator(collector, NODE)) for _ in range(WORLD // NODE)]


def test_ranks_through_aggregators_read_what_they_read_streaming_flat_and_get_their_acks(
    collector: Collector, aggregators: list[str]
):
    shards = 8  # HSDP: each node holds every shard, the nodes replicate
    rng = np.random.default_rng(7)
    flat = {r: OpenStream(collector.grpc_target, rank_hello("flat", r, shards)) for r in range(WORLD)}
    through = {r: OpenStream(aggregators[r // NODE], rank_hello("nodes", r, shards)) for r in range(WORLD)}
    readings: dict[str, list] = {"flat": [], "nodes": []}
    for step in range(STEPS):
        parts = {r: rank_sample(rng, step, energy=r % 3 != 1) for r in range(WORLD)}
        for r, s in through.items():
            s.send(codec.encode(parts[r], step + 1))
        for r, s in flat.items():
            assert s.ack(codec.encode(parts[r], step + 1)) == step + 1
        for s in through.values():  # each rank's frame is acknowledged once its node frame is
            assert acks_until(s, step + 1)[-1].seq == step + 1
        for job in readings:
            assert collector.jobs[job].merged_step == step
            readings[job].append(collector.jobs[job].reading)
    for have, want in zip(readings["nodes"], readings["flat"], strict=True):
        assert np.isfinite(have.layer_entropy).all()
        assert_readings_equal(have, want)
    node_job = collector.jobs["nodes"]
    assert node_job.frames_received == STEPS * WORLD // NODE  # one frame per node per step
    assert sorted(node_job.liveness().ranks) == list(range(WORLD))
    for s in flat.values():
        s.close()
    for s in through.values():
        s.send(None)  # half-close: the node's ranks are done
    finals = [s.acks_to_the_end()[-1] for s in through.values()]  # the collector made the node durable
    assert [(ack.seq, ack.durable) for ack in finals] == [(STEPS, STEPS)] * WORLD


def test_a_rank_that_is_not_one_of_the_nodes_is_refused(collector: Collector, aggregators: list[str]):
    ranks = [OpenStream(aggregators[0], rank_hello("j", r, 1)) for r in range(NODE)]  # the node is complete
    replies, error = stream(aggregators[0], [rank_hello("j", NODE, 1)])
    assert not [r for r in replies if r.HasField("ack")]
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"rank {NODE} is not one of this node's" in error.details()
    for s in ranks:
        s.close()


def test_a_node_whose_last_rank_never_says_hello_streams_once_its_steps_pile_up(collector: Collector):
    rng = np.random.default_rng(9)
    with aggregator(collector, ranks=2) as target:
        s = OpenStream(target, rank_hello("j", 0, 1))  # rank 1 of the node never comes
        for step in range(MAX_PENDING_STEPS + 1):
            s.send(codec.encode(rank_sample(rng, step), step + 1))
        assert acks_until(s, MAX_PENDING_STEPS + 1)[-1].seq == MAX_PENDING_STEPS + 1
        assert sorted(collector.jobs["j"].liveness().ranks) == [0]  # the node speaks for rank 0
        s.close()


def test_a_node_whose_ranks_all_died_takes_the_next_jobs_ranks(collector: Collector):
    """A long-lived aggregator (a Ray actor outlives jobs): once no rank of a job is left, the
    next job's ranks start the node over."""
    rng = np.random.default_rng(10)
    with aggregator(collector, ranks=1) as target:
        crashed = OpenStream(target, rank_hello("a", 0, 1))
        crashed.send(codec.encode(rank_sample(rng, 0), 1))
        assert acks_until(crashed, 1)[-1].seq == 1
        crashed.cancel()  # the job's only rank dies
        s = OpenStream(target, rank_hello("b", 0, 1))
        s.send(codec.encode(rank_sample(rng, 0), 1))
        assert acks_until(s, 1)[-1].seq == 1
        assert collector.jobs["b"].frames_received == 1
        s.close()
