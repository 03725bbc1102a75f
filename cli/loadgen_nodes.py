"""`thermoscope loadgen --nodes N --node-ranks R`: one job of N x R ranks against a collector,
streamed flat (every rank its own stream) and through simulated node aggregators (N streams
of pre-merged node frames, as `collector/node/aggregator.py` sends them), one arm after the other,
each against a fresh collector process.

Printed per arm: the collector's CPU seconds per merged step (its CPU from the end of the
warm-up, when every stream has said hello, to the end of the run, less what the latency
poller alone costs it, measured idle after the run, over the steps merged meanwhile) and the
end-to-end p50/p99 from the send of a step's last frame to the step at `/metrics`
(`loadgen_agents.poll_latency`). The node arm's frames are built once per node (the exact
merge of its R ranks' frames); the aggregator's own merge (~0.2 ms per node per step,
tests/bench/bench_aggregate.py) and its loopback hop are not in its latency.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from thermoscope.science.stats import Table

from . import loadgen_agents as agents
from . import raw_protocol
from .collector_process import start_collector_process

JOB = "loadgen-nodes"
#: Seconds the collector is watched idle (the latency poller only) after the run, to subtract its cost.
IDLE = 3.0
#: Seconds over which the ranks of one step send (a synchronous job's ranks finish a step together).
SPREAD = 0.05


def streams(arm: str, nodes: int, node_ranks: int, layers: int) -> list[tuple[bytes, bytes]]:
    """Each stream's (hello, frame template) for `arm` ("flat": a rank's; "node": a node's)."""
    world = nodes * node_ranks
    layer_table = raw_protocol.layer_table(layers, numel=agents.NUMEL)
    if arm == "flat":
        frame = raw_protocol.frame(1, 0, layers, numel=agents.NUMEL).SerializeToString()
        hellos = (
            raw_protocol.hello(
                JOB, layers=layer_table, rank=rank, world_size=world, run=agents.RUN, agent=agents.RUN
            )
            for rank in range(world)
        )
        return [(hello.SerializeToString(), frame) for hello in hellos]
    rank_table = Table.of_rank(layer_table, raw_protocol.site_table(1))
    sample = raw_protocol.sample(0, layers, numel=agents.NUMEL)
    out = []
    for first in range(0, world, node_ranks):
        ranks = range(first, first + node_ranks)
        node = raw_protocol.Node(
            JOB,
            dict.fromkeys(ranks, rank_table),
            world,
            name=f"node{first // node_ranks}",
            run=agents.RUN,
            agent=agents.RUN,
        )
        frame = node.frame(1, 0, dict.fromkeys(ranks, sample))
        out.append((node.hello.SerializeToString(), frame.SerializeToString()))
    return out


def _last_step(url: str) -> int:
    with urllib.request.urlopen(f"{url}?name[]=thermoscope_last_step", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("thermoscope_last_step{") and f'job_id="{JOB}"' in line:
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def _drive(arm_streams, target: str, url: str, pid: int, rate, duration, warmup, totals) -> dict:
    channels = [
        grpc.aio.insecure_channel(target)
        for _ in range(math.ceil(len(arm_streams) / agents.STREAMS_PER_CHANNEL))
    ]
    stop = threading.Event()
    poller = threading.Thread(
        target=agents.poll_latency, args=({JOB: url}, totals, stop, agents.POLL_INTERVAL), daemon=True
    )
    poller.start()
    start = time.monotonic() + 0.5
    end = start + duration
    totals.warmup_until = start + warmup
    mark: dict[str, float] = {}

    async def at_warmup() -> None:
        await asyncio.sleep(totals.warmup_until - time.monotonic())
        mark["cpu"], mark["step"] = agents.cpu_seconds(pid), await asyncio.to_thread(_last_step, url)
        mark["t"] = time.monotonic()

    marker = asyncio.create_task(at_warmup())
    tasks = [
        asyncio.create_task(
            agents.agent(
                channels[i % len(channels)],
                JOB,
                hello,
                frame,
                rate,
                start,
                end,
                totals,
                True,
                ((i * 0.6180339887) % 1.0) * SPREAD * rate,
            )
        )
        for i, (hello, frame) in enumerate(arm_streams)
    ]
    await asyncio.gather(*tasks)
    await marker
    await asyncio.sleep(1.5)  # the last steps reach /metrics
    cpu, step, t_end = agents.cpu_seconds(pid), await asyncio.to_thread(_last_step, url), time.monotonic()
    await asyncio.sleep(IDLE)  # the latency poller's own cost, no frames: subtracted
    idle_rate = (agents.cpu_seconds(pid) - cpu) / IDLE
    stop.set()
    poller.join(timeout=65)
    for ch in channels:
        await ch.close()
    steps = step - mark["step"]
    return {
        "streams": len(arm_streams),
        "steps": steps,
        "cpu_per_step_s": (cpu - mark["cpu"] - idle_rate * (t_end - mark["t"])) / steps
        if steps
        else math.nan,
        "poller_cores": idle_rate,
        "p50_s": agents.pct(totals.latencies, 50),
        "p99_s": agents.pct(totals.latencies, 99),
        "latency_n": len(totals.latencies),
        "errors": totals.errors,
    }


def run(
    *, nodes: int, node_ranks: int, layers: int, rate: float, duration: float, warmup: float, out
) -> dict[str, dict]:
    """Both arms, one after the other; prints their table and returns their figures."""
    if nodes < 1 or node_ranks < 1 or nodes * node_ranks > agents.MAX_AGENTS:
        raise agents.LoadgenError(
            f"--nodes x --node-ranks must be 1..{agents.MAX_AGENTS} ranks, got {nodes} x {node_ranks}"
        )
    if not (rate > 0 and 0 < warmup < duration):
        raise agents.LoadgenError("--nodes needs --rate > 0 and 0 < --warmup < --duration")
    figures = {}
    for arm in ("flat", "node"):
        arm_streams = streams(arm, nodes, node_ranks, layers)
        with tempfile.TemporaryDirectory(prefix="thermoscope-loadgen-") as tmp:
            collector = start_collector_process(
                Path(tmp) / "collector.db",
                global_options=("--log-level", "WARNING"),
                ready_timeout=30.0,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                totals = agents.Totals(scrape_interval=0)
                figures[arm] = asyncio.run(
                    _drive(
                        arm_streams,
                        collector.grpc_target,
                        collector.metrics_url,
                        collector.proc.pid,
                        rate,
                        duration,
                        warmup,
                        totals,
                    )
                )
            finally:
                collector.stop(timeout=30)
        print(f"{arm}: {figures[arm]}", file=out, flush=True)
        for text in totals.error_text:
            print(f"{arm}: error: {text}", file=out)
    print(
        f"\none job of {nodes} nodes x {node_ranks} ranks x {layers} layers, {rate:g} steps/s, "
        f"{duration:g} s ({warmup:g} s warm-up left out)",
        file=out,
    )
    print(
        "| arm | streams | steps merged | collector CPU per merged step ms | p50 ms | p99 ms | errors |",
        file=out,
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |", file=out)
    for arm, f in figures.items():
        print(
            f"| {arm} | {f['streams']} | {f['steps']} | {f['cpu_per_step_s'] * 1e3:.0f} "
            f"| {f['p50_s'] * 1e3:.0f} | {f['p99_s'] * 1e3:.0f} | {f['errors']} |",
            file=out,
        )
    return figures
