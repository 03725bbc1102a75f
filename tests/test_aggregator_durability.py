"""A node aggregator acknowledges a rank's frame (`Ack.seq`) only once its collector acknowledged
the node frame that holds it, and says it is durable (`Ack.durable`) only once its collector
said that node frame is (issue 21, item 4): through a node its collector refuses, no rank is
told anything and `close()` is False; a frame for a step already forwarded, a rank's restarted
process, a rank reconnecting after the collector refused the node, and a node stream that
breaks and opens again are acknowledged only for what the collector itself acknowledged.

Real aggregators on loopback (on their own event loop thread, as the Ray actor runs one); real
collectors (one requiring tokens, which the aggregator does not send) with real monitors, and a
scripted collector (`helpers/scripted.py`) where the test must say exactly when the collector
acknowledges what.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from thermoscope.agent import Monitor
from thermoscope.collector.node.aggregator import Aggregator
from thermoscope.collector.security import Security
from thermoscope.collector.service import Collector
from thermoscope.collector.state.pipeline import MAX_PENDING_STEPS
from thermoscope.collector.state.store import EventStore
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.codec import PROTOCOL_VERSION

from helpers.protocol import OpenStream, frame, hello
from helpers.scripted import LoopThread, ScriptedCollector
from helpers.security import TOKEN_ANY
from helpers.training import small_model, train_steps

JOB = "durable-node"
STEPS = 30


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


Outcome = tuple[bool, int, int, int, int]  # what close() returned; delivered, dropped, undurable, spooled


def train_ranks(target: str, spool: Path | None) -> dict[int, Outcome]:
    """Ranks 0 and 1 of a job, each a monitor training STEPS sampled steps on its own thread
    through `target` (with a spool under `spool`, or none), then closed: by rank, what `close()`
    returned and what the monitor counted."""
    outcomes: dict[int, Outcome] = {}

    def rank(r: int) -> None:
        model, opt = small_model()
        monitor = Monitor(
            model,
            opt,
            collector=target,
            job=JOB,
            rank=r,
            world_size=2,
            every=1,
            spool=None if spool is None else spool / str(r),
        )
        train_steps(monitor, model, opt, STEPS)
        closed = monitor.close(timeout=20)
        outcomes[r] = (closed, monitor.delivered, monitor.dropped, monitor.undurable, monitor.spooled)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(outcomes) == [0, 1], "a rank did not finish"
    return outcomes


@pytest.mark.parametrize("spooled", [False, True], ids=["no-spool", "spool"])
def test_ranks_through_a_node_its_collector_refuses_close_false_and_count_no_step_delivered(
    tmp_path: Path, spooled: bool
) -> None:
    """The collector requires a token and the aggregator sends none: the node's stream is refused
    (UNAUTHENTICATED) each time it opens. Nothing reached the collector, so no rank was told a
    frame was taken or durable: `close()` is False, nothing is delivered, and every sampled step
    is dropped (or kept in the spool for a later monitor to replay)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_ANY}\n")
    security = Security(tokens=tokens)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "events.db", security=security).running() as c:
        with aggregator(c.grpc_target, ranks=2) as target:
            outcomes = train_ranks(target, tmp_path / "spool" if spooled else None)
        assert c.telemetry.rejected["unauthenticated"] >= 1  # the node's stream was refused
        assert JOB not in c.snapshot()  # the collector holds no frame of the job
    for r, (closed, delivered, dropped, undurable, spool) in outcomes.items():
        if spooled:  # kept for a later monitor to replay: never accepted, so not undurable
            assert (closed, delivered, dropped, undurable, spool) == (False, 0, 0, 0, STEPS), (r, outcomes)
        else:
            assert (closed, delivered, dropped, undurable, spool) == (False, 0, STEPS, 0, 0), (r, outcomes)


@pytest.mark.parametrize("spooled", [False, True], ids=["no-spool", "spool"])
def test_ranks_through_a_node_its_collector_takes_close_true_and_the_collector_holds_every_step(
    tmp_path: Path, spooled: bool
) -> None:
    """The positive control: a collector that takes the node applies and commits a node frame
    per step, and each rank's `close()` is True with every step delivered and durable."""
    db = tmp_path / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db, history_interval=0).running() as c:
        with aggregator(c.grpc_target, ranks=2) as target:
            outcomes = train_ranks(target, tmp_path / "spool" if spooled else None)
        job = c.snapshot()[JOB]
        assert (job["frames_received"], job["last_step"]) == (STEPS, STEPS - 1)  # one node frame per step
        assert sorted(job["ranks"]) == [0, 1]
        assert len(EventStore(db, create=False).history(JOB).step) == STEPS  # committed, every step
    assert outcomes == {r: (True, STEPS, 0, 0, 0) for r in (0, 1)}


# -- what the collector said, and what the ranks were told ------------------------------------------


def until_config(stream: OpenStream) -> list[pb.Ack]:
    """The acks a rank's stream gets before the next relayed Config (a marker the scripted
    collector sends: the aggregator relays it after everything it told the rank before)."""
    acks = []
    while not (reply := stream.reply(timeout=30)).HasField("config"):
        acks.append(reply.ack)
    return acks


def next_ack(stream: OpenStream) -> tuple[int, int]:
    """(seq, durable) of the next ack on a rank's stream (configs skipped)."""
    while not (reply := stream.reply(timeout=30)).HasField("ack"):
        pass
    return reply.ack.seq, reply.ack.durable


def settled(acks: list[pb.Ack]) -> list[tuple[int, int]]:
    """The acks that say something: (seq, durable) of those above 0."""
    return [(a.seq, a.durable) for a in acks if a.seq or a.durable]


def node_of_two(target: str) -> list[OpenStream]:
    return [OpenStream(target, hello(JOB, rank=r, world_size=2)) for r in range(2)]


def answer_node(up: ScriptedCollector, ranks: list[OpenStream]) -> None:
    """Answer the node's hello as a collector of this release does (its config, which says its
    protocol version: the aggregator forwards frames only after it), and read it off the ranks'
    streams, where the aggregator relays it."""
    assert up.message().HasField("hello")
    up.config(protocol_version=PROTOCOL_VERSION)
    for s in ranks:
        assert until_config(s) == []


def test_a_frame_for_a_step_already_forwarded_is_settled_only_with_a_node_frame_the_collector_acked():
    """Rank 0 runs MAX_PENDING_STEPS + 2 steps ahead, so steps 0 and 1 go without rank 1; rank 1's
    frames for them come late and are not merged. They are acknowledged once the collector
    acknowledged the node frame sent last when they came (it follows their steps'), durable once
    that one is durable: not before the collector said anything."""
    with ScriptedCollector() as up, aggregator(up.target, ranks=2) as target:
        r0, r1 = node_of_two(target)
        answer_node(up, [r0, r1])
        for step in range(MAX_PENDING_STEPS + 2):
            r0.send(frame(step + 1, step))
        assert [f.seq for f in up.frames(2)] == [1, 2]  # steps 0 and 1, without rank 1
        r1.send(frame(1, 0))  # late
        r1.send(frame(2, 1))  # late
        r1.send(frame(3, 2))  # completes step 2: node frame 3
        assert [f.seq for f in up.frames(1)] == [3]
        up.config(every=1)
        assert settled(until_config(r1)) == []  # the collector has acknowledged nothing
        up.ack(2, 0)  # node frames 1 and 2: the last one sent when rank 1's late frames came
        assert next_ack(r1) == (2, 0)
        up.ack(3, 3)
        assert next_ack(r1) == (3, 3)
        for s in (r0, r1):
            s.cancel()


def test_a_rank_whose_process_restarted_is_not_acknowledged_for_the_dead_process_frames():
    """Rank 0's process dies with its frame 1 in node frame 1, not yet acknowledged; its new
    process numbers its frames from 1 again. The collector's ack of node frame 1 is not an ack
    of the new process's frame 1 (in node frame 2): only node frame 2's is."""
    with ScriptedCollector() as up, aggregator(up.target, ranks=2) as target:
        r0, r1 = node_of_two(target)
        answer_node(up, [r0, r1])
        r0.send(frame(1, 0))
        r1.send(frame(1, 0))
        assert [f.seq for f in up.frames(1)] == [1]
        r0.cancel()  # the process dies
        r0 = OpenStream(target, hello(JOB, rank=0, world_size=2))  # its restarted process
        r0.send(frame(1, 1))
        r1.send(frame(2, 1))
        assert [f.seq for f in up.frames(1)] == [2]  # step 1: the new process's frame 1
        up.ack(1, 1)  # node frame 1: the dead process's frame 1
        up.config(every=1)
        assert settled(until_config(r0)) == []
        assert settled(until_config(r1)) == [(1, 1)]
        up.ack(2, 2)
        assert next_ack(r0) == (1, 1)
        for s in (r0, r1):
            s.cancel()


def test_a_rank_reconnecting_after_its_collector_refused_the_node_is_told_nothing_of_earlier_frames(
    tmp_path: Path,
) -> None:
    """The collector refuses the node (a token it requires); the ranks' calls end. Rank 0
    reconnects, as an agent without a spool does, with its frame 18 (frames 1-17 went on the
    call that ended, and the collector never took them) and half-closes before the node is
    whole again: its last ack speaks for none of frames 1-17, and not for frame 18 either."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_ANY}\n")
    security = Security(tokens=tokens)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "events.db", security=security).running() as c:
        with aggregator(c.grpc_target, ranks=2) as target:
            r0 = OpenStream(target, hello(JOB, rank=0, world_size=2))
            for step in range(17):
                r0.send(frame(step + 1, step))
            r1 = OpenStream(target, hello(JOB, rank=1, world_size=2))  # the node is whole: refused
            assert [settled(s.acks_to_the_end()) for s in (r0, r1)] == [[], []]
            for s in (r0, r1):
                s.cancel()
            r0 = OpenStream(target, hello(JOB, rank=0, world_size=2))
            r0.send(frame(18, 17))
            r0.send(None)  # half-close: the rank is done
            assert settled(r0.acks_to_the_end()) == []
        assert c.telemetry.rejected["unauthenticated"] >= 1
        assert JOB not in c.snapshot()


def test_a_node_stream_that_breaks_before_durable_ends_the_ranks_calls_and_the_next_one_settles_them():
    """The collector acknowledges node frame 1 and its stream breaks before saying it is durable:
    the ranks were told it was taken, never that it is durable, and their calls end. They
    reconnect and replay it; the new node stream numbers on (node frame 2) and its acks settle
    the replayed frames."""
    with ScriptedCollector() as up, aggregator(up.target, ranks=2) as target:
        ranks = node_of_two(target)
        answer_node(up, ranks)
        for s in ranks:
            s.send(frame(1, 0))
        assert [f.seq for f in up.frames(1)] == [1]
        up.ack(1, 0)
        assert [next_ack(s) for s in ranks] == [(1, 0), (1, 0)]
        up.end(grpc.StatusCode.UNAVAILABLE, "the collector is going away")
        assert [settled(s.acks_to_the_end()) for s in ranks] == [[], []]  # never durable
        for s in ranks:
            s.cancel()
        ranks = node_of_two(target)  # they reconnect and replay frame 1 from their spools
        answer_node(up, ranks)
        assert up.calls == 2
        for s in ranks:
            s.send(frame(1, 0))
        assert [f.seq for f in up.frames(1)] == [2]
        up.ack(2, 2)
        assert [next_ack(s) for s in ranks] == [(1, 1), (1, 1)]
        for s in ranks:
            s.cancel()
