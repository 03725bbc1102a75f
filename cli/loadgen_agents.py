"""The load generator's raw agents and what measures them, for both its modes (`loadgen.py`,
`loadgen_nodes.py`): one agent's stream (`agent`), the run's `Totals`, the latency poller, a
collector process's CPU time, and the error a request the loadgen refuses raises.

An agent sends one hello, then one frame encoded once (`raw_protocol`) whose `seq`, `step` and
`wall_time` a stamp appended to it replaces (`raw_protocol.stamp`), so that sending costs the
loadgen a few microseconds; at most `WINDOW` frames ahead of its acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.contract import STREAM_METHOD

from .raw_protocol import stamp

MAX_AGENTS = 5000
#: Values in each layer of a simulated rank, and the run, host and version its agent says it is.
NUMEL, RUN = 1000, "loadgen"
STREAMS_PER_CHANNEL = 100
#: Frames an agent keeps unacknowledged (`--rate 0` sends as fast as this allows).
WINDOW = 64
#: Seconds between two latency polls: back to back for a service figure (`--rate` > 0); in the
#: peak mode (`--rate 0`) latencies are queueing delays, and ~100 polls a second took ~10 % of
#: the collector's core (py-spy), so it is looked at twice a second there.
POLL_INTERVAL = 0.01
PEAK_POLL_INTERVAL = 0.5


class LoadgenError(ValueError):
    """A request the loadgen refuses (the CLI prints it as a usage error)."""


@dataclass
class Totals:
    """What one run counts: its agents' sends, acks and errors, the pollers' latencies and scrapes."""

    sent: int = 0
    acked: int = 0
    errors: int = 0
    error_text: list[str] = field(default_factory=list)
    scrape_error: str = ""
    scrape_interval: float = 5.0  # seconds between two full scrapes (0: none)
    scrapes: list[float] = field(default_factory=list)  # each full scrape's duration
    scrape_bytes: int = 0  # the last full scrape's size
    latencies: list[float] = field(default_factory=list)
    last_ack: float = 0.0  # when the last ack came (monotonic)
    warmup_until: float = 0.0  # steps sent before this (monotonic) time count apart: the connect storm
    warmup_latencies: list[float] = field(default_factory=list)
    sends: dict[tuple[str, int], float] = field(default_factory=dict)  # (sampled job, step): last send


def cpu_seconds(pid: int) -> float:
    """The user and system CPU seconds process `pid` has used (Linux: /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    """The `q`-th percentile of `values` (NaN: none)."""
    return float(np.percentile(values, q)) if values else math.nan


async def agent(
    channel: grpc.aio.Channel,
    job: str,
    hello: bytes,
    template: bytes,
    rate: float,
    start: float,
    end: float,
    totals: Totals,
    sampled: bool,
    phase: float,
) -> None:
    """One stream of `job` from `start` to `end` (monotonic): `hello` (a rank's, or a node's), then
    `template` frames stamped 1, 2, ... at `rate` Hz (0: as fast as acks allow), the first at
    `phase` of a period; `sampled`: their sends are kept for the latency poller."""
    call = channel.stream_stream(STREAM_METHOD, response_deserializer=pb.CollectorMessage.FromString)()
    window = asyncio.Semaphore(WINDOW)

    async def read() -> None:
        last = 0
        try:
            async for reply in call:
                if reply.HasField("ack") and reply.ack.seq > last:  # (the call's last ack repeats one)
                    totals.acked += reply.ack.seq - last
                    totals.last_ack = time.monotonic()
                    for _ in range(reply.ack.seq - last):
                        window.release()
                    last = reply.ack.seq
        finally:  # the call ended (refused: its error is raised below): no ack will free the writer
            for _ in range(WINDOW):
                window.release()

    reader: asyncio.Task | None = None
    try:
        await call.write(hello)
        reader = asyncio.create_task(read())
        seq = 0
        nxt = start + phase / rate if rate else start  # agents spread over the period
        while True:
            if rate:
                delay = nxt - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                nxt += 1 / rate
            if time.monotonic() >= end:
                break
            await window.acquire()
            if reader.done():
                break
            seq += 1
            now = time.time()
            try:
                await call.write(template + stamp(seq, seq, now))
            except asyncio.InvalidStateError:  # the call ended under the write: the reader has its error
                break
            totals.sent += 1
            if sampled:
                totals.sends[(job, seq)] = time.monotonic()
        with contextlib.suppress(asyncio.InvalidStateError):  # (the call ended already)
            await call.done_writing()
        done, _ = await asyncio.wait({reader}, timeout=10)  # its last acks (not cancelled: see below)
        if done:
            reader.result()  # a refused stream's error
    except grpc.aio.AioRpcError as exc:
        totals.errors += 1
        if len(totals.error_text) < 5:
            totals.error_text.append(f"{exc.code().name}: {exc.details()}")
    finally:
        call.cancel()  # (a reader still waiting for acks ends with CANCELLED: not an error of the run)
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader  # retrieved: an error counts once, from the write or from the reader


def poll_latency(urls: dict[str, str], totals: Totals, stop: threading.Event, interval: float) -> None:
    """Poll every `interval` s; a sampled job's step counts once `thermoscope_last_step` reaches it."""
    jobs_by_url: dict[str, set[str]] = {}
    for job, url in urls.items():
        jobs_by_url.setdefault(url, set()).add(job)
    seen: dict[str, int] = {}
    while not stop.is_set():
        for url, jobs in jobs_by_url.items():
            try:
                with urllib.request.urlopen(f"{url}?name[]=thermoscope_last_step", timeout=30) as resp:
                    text = resp.read().decode()
            except Exception as exc:  # a poll that fails is retried; it is reported once
                if not totals.scrape_error:
                    totals.scrape_error = repr(exc)
                continue
            now = time.monotonic()
            for line in text.splitlines():
                if not line.startswith("thermoscope_last_step{"):
                    continue
                job = line.split('job_id="', 1)[1].split('"', 1)[0]
                if job not in jobs:
                    continue
                step = int(float(line.rsplit(" ", 1)[1]))
                for s in range(seen.get(job, 0) + 1, step + 1):
                    sent = totals.sends.pop((job, s), None)
                    if sent is not None:
                        early = sent < totals.warmup_until
                        (totals.warmup_latencies if early else totals.latencies).append(now - sent)
                seen[job] = max(seen.get(job, 0), step)
        stop.wait(interval)
