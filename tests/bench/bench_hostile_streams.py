"""The gRPC port under hostile clients, against `thermoscope collector` processes on loopback.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_hostile_streams.py [--spellings 100] [--quota 20] [--floods 5]
        [--collector-args ...]

1. Spellings: one token sent as `--spellings` different `authorization` values (the case of
   "Bearer", the spaces after it), one held stream each (a hello, a job each), against
   `--max-jobs-per-token QUOTA`: how many runs the token held, and whether another tenant's token
   still streams.
2. Frozen client: a client process holds one run (`--max-jobs-per-token 1`) and is stopped with
   SIGSTOP: seconds until the same token may hold another run (bounded by `--wait`).
3. PING flood: a raw HTTP/2 client sends PINGs for `--flood` seconds, from `--pause` s after its
   handshake (grpc's race is likelier so: collector/ingest/reaper.py), on `--floods` collectors:
   the GOAWAY, whether and when the collector closed the connection, its CPU seconds meanwhile.

`--collector-args` go to every collector (e.g. `--keepalive 1 --keepalive-timeout 1`).
Results: docs/security.md (#bad-input-and-limits).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from thermoscope.cli.loadgen_agents import cpu_seconds
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc

from helpers.http2 import ping_flood
from helpers.processes import start_collector_process
from helpers.protocol import held_in_a_process, hello
from helpers.security import TOKEN_A, TOKEN_ANY


def spellings(token: str, n: int) -> list[str]:
    """`n` authorization values that all carry `token`: the scheme's case, 1.. spaces after it."""
    cases = ["".join(c) for c in itertools.product(*((ch.lower(), ch.upper()) for ch in "bearer"))]
    values = (f"{case}{' ' * spaces}{token}" for spaces in itertools.count(1) for case in cases)
    return list(itertools.islice(values, n))


async def open_stream(target: str, job: str, authorization: str) -> tuple[object, grpc.StatusCode | None]:
    """A stream held after its hello: ((channel, call), None) if the collector answered with its
    config, else (None, its status code)."""
    channel = grpc.aio.insecure_channel(target)
    call = pb_grpc.TelemetryStub(channel).Stream(metadata=(("authorization", authorization),))
    await call.write(hello(job))
    try:
        reply: pb.CollectorMessage = await call.read()
    except grpc.aio.AioRpcError as exc:
        await channel.close()
        return None, exc.code()
    assert reply.HasField("config")
    return (channel, call), None


async def held_by_spellings(target: str, n: int) -> tuple[int, grpc.StatusCode | None]:
    """Runs one token held through `n` spellings, and the other tenant's outcome (None: it streams)."""
    held, refused = [], []
    for i, value in enumerate(spellings(TOKEN_ANY, n)):
        stream, code = await open_stream(target, f"spelled-{i}", value)
        (held if stream else refused).append(stream or code)
    other, code = await open_stream(target, "other-tenant", f"Bearer {TOKEN_A}")
    for channel, call in [*held, *([other] if other else [])]:
        call.cancel()
        await channel.close()
    return len(held), code


def frozen_release(target: str, wait: float) -> float | None:
    """Seconds from SIGSTOP of a client holding the token's one run until the token holds another."""
    holder = held_in_a_process(target, "frozen", f"Bearer {TOKEN_ANY}")
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while time.monotonic() - stopped < wait:
            stream, _ = asyncio.run(open_stream(target, "after-freeze", f"Bearer {TOKEN_ANY}"))
            if stream is not None:
                asyncio.run(_close(*stream))
                return time.monotonic() - stopped
            time.sleep(0.25)
        return None
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


async def _close(channel, call) -> None:
    call.cancel()
    await channel.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spellings", type=int, default=100)
    p.add_argument("--quota", type=int, default=20)
    p.add_argument("--wait", type=float, default=20.0)
    p.add_argument("--flood", type=float, default=5.0)
    p.add_argument("--floods", type=int, default=5, help="PING floods, each on a new collector")
    p.add_argument("--pause", type=float, default=0.2, help="seconds between a flood's handshake and PINGs")
    p.add_argument("--collector-args", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text(f"{TOKEN_ANY}\n{TOKEN_A}\n")
        common = ("--tokens", str(tokens), "--checkpoint-interval", "0.2", *args.collector_args)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}

        c = start_collector_process(
            Path(tmp) / "1.db", None, "--max-jobs-per-token", str(args.quota), *common, **quiet
        )
        try:
            held, other = asyncio.run(held_by_spellings(c.grpc_target, args.spellings))
        finally:
            c.stop()
        print(
            f"spellings: {args.spellings} spellings of one token, quota {args.quota}: held {held} runs; "
            f"another tenant: {'streams' if other is None else other.name}"
        )

        c = start_collector_process(Path(tmp) / "2.db", None, "--max-jobs-per-token", "1", *common, **quiet)
        try:
            released = frozen_release(c.grpc_target, args.wait)
        finally:
            c.stop()
        print(
            "frozen client: "
            + (f"released after {released:.1f} s" if released is not None else f"held after {args.wait:g} s")
        )

        for n in range(args.floods):
            c = start_collector_process(Path(tmp) / f"flood{n}.db", None, *common, **quiet)
            try:
                host, port = c.grpc_target.rsplit(":", 1)
                before = cpu_seconds(c.proc.pid)
                flood = ping_flood(host, int(port), args.flood, args.pause)
                spent = cpu_seconds(c.proc.pid) - before
            finally:
                c.stop()
            closed = flood.closed_after_goaway
            print(
                f"PING flood for {args.flood:g} s: {flood.sent} PINGs, GOAWAY code {flood.goaway}, "
                + (f"closed {closed:.2f} s after it" if closed is not None else "connection still open")
                + f", {flood.acks_after_goaway} PING ACKs after it; collector CPU {spent:.2f} s"
            )


if __name__ == "__main__":
    main()
