"""Version skew, both directions, with the previous release's wire (docs/security.md, "Version skew").

A collector upgraded in the middle of a job keeps serving the agents of the previous release, and
an agent (or a node aggregator) newer than its collector degrades instead of stopping or, worse,
being misread: tests/helpers/previous_wire/ holds the previous release's stubs and a collector
that speaks only them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from thermoscope.agent import Monitor
from thermoscope.collector.node.aggregator import OLDER_COLLECTOR, Aggregator
from thermoscope.wire.codec import OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION
from thermoscope.wire.contract import STREAM_METHOD

from helpers.previous_wire import PreviousCollector
from helpers.previous_wire import telemetry_pb2 as previous
from helpers.processes import start_collector_process
from helpers.protocol import OpenStream, frame, hello, stream
from helpers.scripted import LoopThread
from helpers.training import small_model, train_steps

JOB = "skew"
FRAMES = 12


def as_previous(message) -> previous.AgentMessage:
    """This release's message as the previous release's stubs make it: only the fields that
    release knew travel (a rank's messages set no other)."""
    old = previous.AgentMessage.FromString(message.SerializeToString())
    old.DiscardUnknownFields()
    assert old.SerializeToString() == message.SerializeToString()  # nothing newer was set
    return old


def test_an_agent_of_the_previous_release_streams_to_this_collector_and_every_frame_is_acked(
    tmp_path: Path,
) -> None:
    """Direction N-1 -> N: a stream of the previous release's messages, over the previous stubs,
    to a collector process of this release: its hello is accepted and every frame acknowledged."""
    collector = start_collector_process(tmp_path / "events.db")
    try:
        messages = [as_previous(hello(JOB))] + [as_previous(frame(s + 1, s)) for s in range(FRAMES)]
        with grpc.insecure_channel(collector.grpc_target) as channel:
            call = channel.stream_stream(
                STREAM_METHOD,
                request_serializer=previous.AgentMessage.SerializeToString,
                response_deserializer=previous.CollectorMessage.FromString,
            )
            replies = list(call(iter(messages), timeout=60))
    finally:
        collector.stop()
    assert replies[0].HasField("config")  # the answer to its hello
    assert max(r.ack.seq for r in replies if r.HasField("ack")) == FRAMES


def test_this_agent_streams_to_a_collector_of_the_previous_release(tmp_path: Path) -> None:
    """Direction N -> N-1: a `Monitor` of this release trains against a collector that speaks
    only the previous wire (its config says no protocol version): every sampled step is
    delivered, and the previous stubs read its hello and frames whole."""
    steps = 6
    with PreviousCollector() as old:
        model, opt = small_model()
        monitor = Monitor(model, opt, collector=old.target, job=JOB, every=1)
        train_steps(monitor, model, opt, steps)
        assert monitor.close(timeout=30)
        assert monitor.delivered == steps
        received = old.messages()
    assert received[0].HasField("hello") and received[0].hello.layers
    assert sorted({m.frame.step for m in received if m.HasField("frame")}) == list(range(steps))


@contextlib.contextmanager
def aggregator(collector: str, ranks: int) -> Iterator[str]:
    """An `Aggregator` for `ranks` ranks forwarding to `collector`: its loopback address."""
    loop = LoopThread("aggregator")
    node = Aggregator(collector, ranks)
    server = loop.call(node.start("127.0.0.1:0"))
    try:
        yield f"127.0.0.1:{node.port}"
    finally:
        loop.call(server.stop(0))
        loop.call(node.close())
        loop.close()


def test_a_node_aggregator_forwards_no_frame_to_a_collector_of_the_previous_release_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node stream means nothing to the previous release (it would read the node's merged
    frames as one rank's: wrong readings, silently). The aggregator sends its hello, reads the
    answer (no protocol version), forwards no frame, ends its ranks' calls (UNAVAILABLE) with the
    reason, and logs it; the ranks retry as after any outage."""
    caplog.set_level(logging.WARNING, logger="thermoscope.aggregator")
    with PreviousCollector() as old, aggregator(old.target, ranks=2) as target:
        ranks = [OpenStream(target, hello(JOB, rank=r, world_size=2)) for r in range(2)]
        for s in ranks:
            s.send(frame(1, 0))
        ended = [s.acks_to_the_end() for s in ranks]
        time.sleep(0.5)  # anything forwarded would have arrived by now
        received = old.messages()
        for s in ranks:
            s.cancel()
    assert ended == [[], []]
    assert [m.WhichOneof("body") for m in received] == ["hello"]  # the node's hello, no frame
    assert OLDER_COLLECTOR in caplog.text


def test_a_hello_of_a_newer_protocol_is_refused_naming_the_versions_this_collector_speaks(
    tmp_path: Path,
) -> None:
    """An agent newer than its collector (protocol N+1) is refused FAILED_PRECONDITION with the
    versions the collector speaks, the line its sender logs while it retries with backoff; the
    previous release's version (N-1, the floor) is accepted."""
    collector = start_collector_process(tmp_path / "events.db")
    try:
        newer = hello(JOB)
        newer.hello.protocol_version = PROTOCOL_VERSION + 1
        replies, error = stream(collector.grpc_target, [newer])
        oldest = hello(JOB + "-oldest")
        oldest.hello.protocol_version = OLDEST_PROTOCOL_VERSION
        accepted, no_error = stream(collector.grpc_target, [oldest, frame(1, 0)])
    finally:
        collector.stop()
    assert replies == [] and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"speaks {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}" in error.details()
    assert "waits for the collector's upgrade" in error.details()
    assert no_error is None and accepted[-1].ack.seq == 1
