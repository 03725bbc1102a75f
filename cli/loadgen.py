"""`thermoscope loadgen`: drive collectors on loopback with many light agents and measure them.

Agents speak the raw protocol (`raw_protocol.py`), not a `Monitor`: each sends one frame
encoded once, restamped at each send (`loadgen_agents.agent`), so that sending costs the
loadgen a few microseconds. Many streams share a few `grpc.aio` channels in one asyncio loop.
Agents form jobs of `--world-size` ranks; with `--collectors K` jobs are sharded over K
collector processes (each to the one `contract.shard` picks), as users would scale out.

Latency is from the send of a step's last rank to that step appearing as
`thermoscope_last_step{job_id}` at `/metrics`, measured on a sample of jobs (`--latency-jobs`)
by polling `/metrics?name[]=thermoscope_last_step` back to back (the family alone, so the
poll measures when a value becomes visible, not how long a full body takes to render; with
`--rate 0`, the peak mode whose latencies are queueing delays, twice a second, so that the
polls leave the collector's core to the frames). Beside
it, a full scrape every `--scrape-interval` seconds stands for Prometheus: its cost is in the
collector's CPU and its durations are printed. Collector CPU (cores used over the whole run,
connecting and draining included) and peak RSS come from `/proc/<pid>` of the collectors the
loadgen started (not reported with `--target`); `--pin` gives each collector a CPU of its own
and the loadgen the others, so a per-core figure is one. Frames/s: acknowledged frames over
the duration, or until the last ack when the collectors fell behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from thermoscope.wire.contract import is_loopback, shard, split_address

from . import raw_protocol
from .collector_process import CollectorProcess
from .loadgen_agents import (
    MAX_AGENTS,
    NUMEL,
    PEAK_POLL_INTERVAL,
    POLL_INTERVAL,
    RUN,
    STREAMS_PER_CHANNEL,
    LoadgenError,
    Totals,
    agent,
    cpu_seconds,
    pct,
    poll_latency,
)

MAX_DURATION = 600.0
MAX_LAYERS = 5000


def check_loopback(target: str) -> None:
    if not is_loopback(split_address(target)[0]):
        raise LoadgenError(f"loadgen drives loopback collectors only, not {target!r}")


def check_bounds(agents: int, layers: int, rate: float, duration: float, world_size: int) -> None:
    if not 1 <= agents <= MAX_AGENTS:
        raise LoadgenError(f"--agents must be 1..{MAX_AGENTS}, got {agents}")
    if not 1 <= layers <= MAX_LAYERS:
        raise LoadgenError(f"--layers must be 1..{MAX_LAYERS}, got {layers}")
    if not (math.isfinite(rate) and rate >= 0):
        raise LoadgenError(f"--rate must be >= 0 Hz (0: as fast as acks allow), got {rate}")
    if not 0 < duration <= MAX_DURATION:
        raise LoadgenError(f"--duration must be in (0, {MAX_DURATION:g}] s, got {duration}")
    if world_size < 1 or agents % world_size:
        raise LoadgenError(f"--agents ({agents}) must be a multiple of --world-size ({world_size})")


def start_collectors(
    k: int, workdir: Path, profile: bool = False, pin: bool = False
) -> list[CollectorProcess]:
    """`k` collector processes on free loopback ports, once each serves; `pin`: collector i on CPU i
    alone (the loadgen keeps the CPUs left, see `run`)."""
    cpus = sorted(os.sched_getaffinity(0))
    out = []
    for i in range(k):
        cpu = {cpus[i]} if pin else None
        cprofile = ("-m", "cProfile", "-o", str(workdir / f"collector{i}.prof")) if profile else ()
        out.append(
            CollectorProcess.launch(
                workdir / f"collector{i}.db",
                global_options=("--log-level", "WARNING"),
                python_options=cprofile,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=None if cpu is None else lambda cpu=cpu: os.sched_setaffinity(0, cpu),
            )
        )
    try:
        for collector in out:
            collector.wait_serving(timeout=30.0)
    except BaseException:  # none is left running
        for collector in out:
            collector.stop()
        raise
    return out


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _scrape_full(urls: set[str], totals: Totals, stop: threading.Event) -> None:
    """Scrape every collector's whole /metrics every `scrape_interval` s, as Prometheus would."""
    while not stop.wait(totals.scrape_interval):
        for url in urls:
            began = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    totals.scrape_bytes = len(resp.read())
                totals.scrapes.append(time.monotonic() - began)
            except Exception as exc:  # reported once
                if not totals.scrape_error:
                    totals.scrape_error = repr(exc)


async def _drive(
    collectors: list[tuple[str, str]],
    agents: int,
    layers: int,
    rate: float,
    duration: float,
    world_size: int,
    latency_jobs: int,
    warmup: float,
    totals: Totals,
    progress,
) -> float:
    """`collectors`: their (gRPC target, /metrics URL)."""
    table = raw_protocol.layer_table(layers, numel=NUMEL)
    template = raw_protocol.frame(1, 0, layers, numel=NUMEL).SerializeToString()

    def hello(job: str, rank: int) -> bytes:
        msg = raw_protocol.hello(job, layers=table, rank=rank, world_size=world_size, run=RUN, agent=RUN)
        return msg.SerializeToString()

    jobs = agents // world_size
    per_collector: list[list[grpc.aio.Channel]] = []
    for grpc_target, _ in collectors:
        n = max(1, math.ceil(jobs * world_size / len(collectors) / STREAMS_PER_CHANNEL))
        per_collector.append([grpc.aio.insecure_channel(grpc_target) for _ in range(n)])
    # each job to its collector as agents given every address pick it (`contract.shard`)
    targets = ",".join(grpc_target for grpc_target, _ in collectors)
    index = {grpc_target: i for i, (grpc_target, _) in enumerate(collectors)}
    home = {f"loadgen-{j}": index[shard(targets, f"loadgen-{j}")] for j in range(jobs)}
    sampled = {f"loadgen-{j}" for j in range(0, jobs, max(1, jobs // max(1, latency_jobs)))}
    urls = {job: collectors[i][1] for job, i in home.items()}
    stop = threading.Event()
    poll = POLL_INTERVAL if rate else PEAK_POLL_INTERVAL
    pollers = [
        threading.Thread(target=poll_latency, args=({j: urls[j] for j in sampled}, totals, stop, poll))
    ]
    if totals.scrape_interval > 0:
        full = {metrics_url for _, metrics_url in collectors}
        pollers.append(threading.Thread(target=_scrape_full, args=(full, totals, stop)))
    for poller in pollers:
        poller.daemon = True
        poller.start()
    start = time.monotonic() + 0.5
    end = start + duration
    totals.warmup_until = start + warmup
    tasks = []
    count = 0
    for j in range(jobs):
        job = f"loadgen-{j}"
        channels = per_collector[home[job]]
        for rank in range(world_size):
            channel = channels[count % len(channels)]
            count += 1
            tasks.append(
                asyncio.create_task(
                    agent(
                        channel,
                        job,
                        hello(job, rank),
                        template,
                        rate,
                        start,
                        end,
                        totals,
                        job in sampled,
                        (count * 0.6180339887) % 1.0,
                    )
                )
            )

    async def report() -> None:
        last, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            progress(totals, (totals.acked - last) / (now - last_t), now - start)
            last, last_t = totals.acked, now

    reporter = asyncio.create_task(report())
    await asyncio.gather(*tasks)
    # the run's length: its duration, or until the last ack if the collectors fell behind
    elapsed = max(duration, totals.last_ack - start)
    reporter.cancel()
    await asyncio.sleep(1.5)  # let the last sampled steps reach /metrics
    stop.set()
    for poller in pollers:
        poller.join(timeout=65)
    for channels in per_collector:
        for ch in channels:
            await ch.close()
    return elapsed


def run(
    *,
    agents: int,
    layers: int,
    rate: float,
    duration: float,
    world_size: int = 4,
    collectors: int = 1,
    target: str | None = None,
    target_metrics: str | None = None,
    latency_jobs: int = 20,
    scrape_interval: float = 5.0,
    warmup: float = 0.0,
    profile: bool = False,
    pin: bool = False,
    out=sys.stdout,
) -> dict[str, float]:
    """Drive the load and print a table; returns its figures. `pin`: each collector on a CPU of
    its own, the loadgen on the others (so "one core" means one)."""
    check_bounds(agents, layers, rate, duration, world_size)
    if not (math.isfinite(scrape_interval) and scrape_interval >= 0):
        raise LoadgenError(f"--scrape-interval must be >= 0 s (0: no full scrapes), got {scrape_interval}")
    if not 0 <= warmup < duration:
        raise LoadgenError(f"--warmup must be >= 0 s and shorter than --duration, got {warmup}")
    if target is not None:
        check_loopback(target)
        if collectors != 1:
            raise LoadgenError("--collectors starts its own collectors: leave out --target")
    affinity = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="thermoscope-loadgen-") as tmp:
        if target is None:
            if pin and collectors >= len(os.sched_getaffinity(0)):
                raise LoadgenError(
                    f"--pin needs more CPUs than --collectors ({collectors}): one is the loadgen's"
                )
            started = start_collectors(collectors, Path(tmp), profile, pin)
            addresses = [(c.grpc_target, c.metrics_url) for c in started]
            if pin:
                os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[collectors:])
        else:
            if target_metrics is None:
                raise LoadgenError("--target needs --target-metrics, the collector's /metrics URL")
            started, addresses = [], [(target, target_metrics)]
        pids = [c.proc.pid for c in started]
        cpu0, wall0 = {pid: cpu_seconds(pid) for pid in pids}, time.monotonic()
        rss_peak = dict.fromkeys(pids, 0)
        totals = Totals(scrape_interval=scrape_interval)

        def progress(t: Totals, fps: float, at: float) -> None:
            for pid in pids:
                with contextlib.suppress(OSError):
                    rss_peak[pid] = max(rss_peak[pid], _rss_bytes(pid))
            p99 = pct(t.latencies, 99)
            print(
                f"t={at:5.1f}s acked frames/s={fps:9.0f} layer-samples/s={fps * layers:11.0f} "
                f"sent={t.sent} acked={t.acked} errors={t.errors} p99={p99 * 1e3:.0f}ms",
                file=out,
                flush=True,
            )

        try:
            elapsed = asyncio.run(
                _drive(
                    addresses,
                    agents,
                    layers,
                    rate,
                    duration,
                    world_size,
                    latency_jobs,
                    warmup,
                    totals,
                    progress,
                )
            )
            cpu = {pid: cpu_seconds(pid) - cpu0[pid] for pid in pids}
            wall = time.monotonic() - wall0  # the CPU's window: connecting and draining included
            for pid in pids:
                rss_peak[pid] = max(rss_peak[pid], _rss_bytes(pid))
        finally:
            os.sched_setaffinity(0, affinity)
            for collector in started:
                collector.stop(timeout=30)
            if profile:
                _print_profile(Path(tmp), out)
    fps = totals.acked / elapsed
    figures = {
        "agents": agents,
        "layers": layers,
        "rate_hz": rate,
        "duration_s": duration,
        "collectors": collectors,
        "frames_sent": totals.sent,
        "frames_acked": totals.acked,
        "frames_per_s": fps,
        "layer_samples_per_s": fps * layers,
        "latency_p50_s": pct(totals.latencies, 50),
        "latency_p99_s": pct(totals.latencies, 99),
        "latency_samples": len(totals.latencies),
        "warmup_s": warmup,
        "warmup_latency_max_s": max(totals.warmup_latencies, default=math.nan),
        "errors": totals.errors,
        "collector_cpu_cores": sum(cpu.values()) / wall if pids else math.nan,
        "collector_rss_peak_mib": max(rss_peak.values()) / 2**20 if pids else math.nan,
        "collector_rss_total_mib": sum(rss_peak.values()) / 2**20 if pids else math.nan,
    }
    _table(figures, out)
    for text in totals.error_text:
        print(f"error: {text}", file=out)
    if totals.scrapes:
        print(
            f"full /metrics scrapes: {len(totals.scrapes)} of {totals.scrape_bytes / 2**20:.1f} MiB, "
            f"mean {statistics.mean(totals.scrapes) * 1e3:.0f} ms, max {max(totals.scrapes) * 1e3:.0f} ms",
            file=out,
        )
    if warmup:
        print(
            f"warm-up (steps sent in the first {warmup:g} s, left out of p50/p99): "
            f"{len(totals.warmup_latencies)} steps, "
            f"largest latency {figures['warmup_latency_max_s'] * 1e3:.0f} ms",
            file=out,
        )
    if totals.scrape_error:
        print(f"scraping /metrics failed at least once: {totals.scrape_error}", file=out)
    return figures


def _table(f: dict[str, float], out) -> None:
    rate = "max" if not f["rate_hz"] else f"{f['rate_hz']:g}"
    head = (
        "| agents | layers | rate Hz | s | collectors | frames/s | layer-samples/s | p50 ms | p99 ms "
        "| latency n | errors | collector CPU cores | RSS peak MiB (one) | RSS MiB (all) |"
    )
    print(head, file=out)
    print("|" + " ---: |" * (head.count("|") - 1), file=out)
    print(
        f"| {f['agents']} | {f['layers']} | {rate} | {f['duration_s']:g} | {f['collectors']} "
        f"| {f['frames_per_s']:.0f} | {f['layer_samples_per_s']:.0f} | {f['latency_p50_s'] * 1e3:.0f} "
        f"| {f['latency_p99_s'] * 1e3:.0f} | {f['latency_samples']} | {f['errors']} "
        f"| {f['collector_cpu_cores']:.2f} | {f['collector_rss_peak_mib']:.0f} "
        f"| {f['collector_rss_total_mib']:.0f} |",
        file=out,
        flush=True,
    )


def _print_profile(workdir: Path, out) -> None:
    import pstats

    for prof in sorted(workdir.glob("*.prof")):
        print(f"\ncProfile of {prof.stem} (top 15 by own time):", file=out)
        pstats.Stats(str(prof), stream=out).sort_stats("tottime").print_stats(15)


def add_arguments(sub) -> None:
    """The `loadgen` subcommand's parser."""
    lg = sub.add_parser(
        "loadgen", help="drive collectors on loopback with many light agents; print throughput and latency"
    )
    lg.add_argument(
        "--agents", type=int, default=100, help=f"agents (streams), 1..{MAX_AGENTS} (default 100)"
    )
    lg.add_argument("--layers", type=int, default=200, help="layers per frame (default 200)")
    lg.add_argument(
        "--rate", type=float, default=1.0, help="frames/s per agent (default 1; 0: as fast as acks)"
    )
    lg.add_argument(
        "--duration", type=float, default=10.0, help=f"seconds, at most {MAX_DURATION:g} (default 10)"
    )
    lg.add_argument("--world-size", type=int, default=4, help="ranks per job (default 4)")
    lg.add_argument(
        "--collectors", type=int, default=1, help="collector processes to start, jobs sharded over them"
    )
    lg.add_argument(
        "--target", help="an existing collector's gRPC HOST:PORT on loopback (default: start one)"
    )
    lg.add_argument("--target-metrics", help="that collector's /metrics URL (with --target)")
    lg.add_argument(
        "--scrape-interval",
        type=float,
        default=5.0,
        help="seconds between two full /metrics scrapes, as Prometheus would do (default 5; 0: none)",
    )
    lg.add_argument("--latency-jobs", type=int, default=20, help="jobs whose latency is sampled (default 20)")
    lg.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds at the start whose steps are left out of p50/p99 (the connect storm: every agent's "
        "hello at once); their largest latency is printed apart (default 0)",
    )
    lg.add_argument("--profile", action="store_true", help="run the collectors under cProfile and print it")
    lg.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="one job of NODES x --node-ranks ranks, flat and through simulated node aggregators: "
        "collector CPU per merged step and p99 of each (loadgen_nodes.py; 0: the usual run)",
    )
    lg.add_argument("--node-ranks", type=int, default=8, help="ranks per node with --nodes (default 8)")
    lg.add_argument(
        "--pin",
        action="store_true",
        help="pin collector i to CPU i alone and the loadgen to the CPUs left (Linux): per-core figures",
    )


def main(args, p) -> int:
    if args.nodes:
        from . import loadgen_nodes

        try:
            figures = loadgen_nodes.run(
                nodes=args.nodes,
                node_ranks=args.node_ranks,
                layers=args.layers,
                rate=args.rate,
                duration=args.duration,
                warmup=args.warmup,
                out=sys.stdout,
            )
        except LoadgenError as exc:
            p.error(f"loadgen: {exc}")
        return 1 if any(f["errors"] for f in figures.values()) else 0
    try:
        if args.collectors < 1:
            raise LoadgenError(f"--collectors must be at least 1, got {args.collectors}")
        figures = run(
            agents=args.agents,
            layers=args.layers,
            rate=args.rate,
            duration=args.duration,
            world_size=args.world_size,
            collectors=args.collectors,
            target=args.target,
            target_metrics=args.target_metrics,
            latency_jobs=args.latency_jobs,
            warmup=args.warmup,
            pin=args.pin,
            scrape_interval=args.scrape_interval,
            profile=args.profile,
        )
    except LoadgenError as exc:
        p.error(f"loadgen: {exc}")
    return 1 if figures["errors"] else 0
