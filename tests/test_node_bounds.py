"""What node streams can make a collector hold: the ranks a job's streams claim together are at
most its world (a node stream that claims a rank another open stream of the job holds is
refused, FAILED_PRECONDITION `rank_taken`), and an ended stream keeps only the ranks it still
speaks for (a newer stream's claim takes them over), so a flood of node hellos neither grows the
collector nor stays in it.

Real collector processes on loopback; the flood is raw node hellos (`wire.node`'s form), 200 of
them, each claiming up to 16,384 ranks (the issue's 1,200, scaled down to run in seconds here).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import numpy as np

from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc
from thermoscope.wire import codec

from helpers.fuzzing import rss_bytes
from helpers.metrics import scrape
from helpers.nodes import nodes_of, rank_hello, rank_sample
from helpers.processes import start_collector_process
from helpers.protocol import AGENT, BINS, RUN, OpenStream, layer_table, stream

WORLD = 16_384
HELLOS = 200
MIB = 1 << 20


def flood_hello(first: int) -> pb.AgentMessage:
    """A node hello from rank `first` claiming every rank above it, in a world of WORLD."""
    msg = codec.hello(
        job_id="flood",
        run_id=RUN,
        rank=first,
        world_size=WORLD,
        host=AGENT,
        agent_version=AGENT,
        every=1,
        layers=layer_table(1),
        sites=[],
        bins=BINS,
    )
    msg.hello.ranks.extend(range(first, WORLD))
    return msg


async def _flood(target: str, opened: asyncio.Event, cancel: asyncio.Event) -> dict[str, int]:
    """Open HELLOS node streams at once, hold those the collector took until `cancel`, then cancel
    them all (a crashed client); how many were answered with a config, and how many refused."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TelemetryStub(channel)
        calls = [stub.Stream() for _ in range(HELLOS)]
        for i, call in enumerate(calls):
            await call.write(flood_hello(i))
        outcome = {"taken": 0, "refused": 0}
        for call in calls:
            try:
                reply = await call.read()
                outcome["taken" if reply is not grpc.aio.EOF and reply.HasField("config") else "refused"] += 1
            except grpc.aio.AioRpcError:
                outcome["refused"] += 1
        opened.set()
        await cancel.wait()
        for call in calls:
            call.cancel()
        return outcome


def _scrape_seconds(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as reply:
        reply.read()
    return time.perf_counter() - start


def test_a_flood_of_node_hellos_claiming_the_world_neither_grows_the_collector_nor_stays(tmp_path):
    collector = start_collector_process(tmp_path / "e.db")
    pid = collector.proc.pid
    try:
        base = rss_bytes(pid)

        async def run() -> tuple[dict[str, int], int, int]:
            opened, cancel = asyncio.Event(), asyncio.Event()
            flood = asyncio.create_task(_flood(collector.grpc_target, opened, cancel))
            await opened.wait()
            held = rss_bytes(pid)
            cancel.set()
            outcome = await flood
            return outcome, held, rss_bytes(pid)

        outcome, held, _ = asyncio.run(run())
        deadline = time.monotonic() + 30  # every cancelled call has ended at the collector
        while stream_count(collector.metrics_url) and time.monotonic() < deadline:
            time.sleep(0.2)
        after = rss_bytes(pid)
        scrape = _scrape_seconds(collector.metrics_url)
        print(
            f"\n{HELLOS} node hellos x up to {WORLD} ranks: {outcome}; collector RSS {base / MIB:.0f} MiB"
            f" -> {held / MIB:.0f} MiB held -> {after / MIB:.0f} MiB after the cancels; scrape {scrape:.2f} s"
        )
        assert outcome["taken"] + outcome["refused"] == HELLOS
        assert outcome["taken"] == 1  # the first claims the world: every later hello overlaps it
        assert held - base < 64 * MIB
        assert after - base < 64 * MIB
    finally:
        collector.stop()


def stream_count(url: str) -> float:
    """The ranks the collector counts as connected, summed over jobs, from its /metrics."""
    return sum(v for (name, _), v in scrape(url).items() if name == "thermoscope_agents_connected")


def test_a_stream_claiming_a_rank_another_open_stream_of_the_job_holds_is_refused(collector):
    node = nodes_of("j", 1)[0]  # ranks 0 .. 7
    held = OpenStream(collector.grpc_target, node.hello)
    overlapping = flood_hello(4)
    overlapping.hello.job_id, overlapping.hello.world_size = "j", 16
    del overlapping.hello.ranks[:]
    overlapping.hello.ranks.extend(range(4, 12))
    for claim in (overlapping, rank_hello("j", 5, 1)):  # another node's, and a rank's own stream
        _, error = stream(collector.grpc_target, [claim])
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "are claimed by another open stream" in error.details()
    assert collector.telemetry.rejected["rank_taken"] == 2
    assert sorted(collector.jobs["j"].liveness().ranks) == list(range(8))
    held.close()


def test_an_ended_node_stream_whose_rank_streams_again_is_let_go_whole(collector):
    rng = np.random.default_rng(3)
    node = nodes_of("j", 1)[0]  # ranks 0 .. 7
    lost = OpenStream(collector.grpc_target, node.hello)
    assert lost.ack(node.frame(1, 0, {r: rank_sample(rng, 0) for r in range(8)})) == 1
    lost.cancel()
    job = collector.jobs["j"]
    deadline = time.monotonic() + 15
    while job.open_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(job.liveness().ranks) == list(range(8)) and not job.liveness().connected
    back = OpenStream(collector.grpc_target, rank_hello("j", 3, 1))  # rank 3 streams flat now
    live = job.liveness()
    assert list(live.ranks) == [3] and live.connected == 1
    assert job.ranks.claims == {3: 3} and not job.ranks.lost
    back.close()
