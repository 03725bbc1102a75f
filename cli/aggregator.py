"""`thermoscope aggregator`: a node's aggregator (collector/node/aggregator.py) as its own process.

Its node's agents point at it (`THERMOSCOPE_COLLECTOR=127.0.0.1:PORT`) instead of the job's
collector; it forwards one merged frame per step to `--collector`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal


def add_arguments(sub) -> None:
    """The `aggregator` subcommand's parser."""
    a = sub.add_parser(
        "aggregator", help="pre-merge this node's ranks into one frame per step for the job's collector"
    )
    a.add_argument("--collector", required=True, help="the job's collector, HOST:PORT")
    a.add_argument(
        "--listen", default="127.0.0.1:50052", help="loopback HOST:PORT the node's agents stream to"
    )
    a.add_argument("--ranks", type=int, required=True, help="how many ranks run on this node")


def main(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from thermoscope.collector.node.aggregator import Aggregator  # grpc only when this verb runs

    if args.ranks < 1:
        p.error(f"aggregator: --ranks must be at least 1, got {args.ranks}")
    aggregator = Aggregator(args.collector, args.ranks)

    async def serve() -> None:
        try:
            server = await aggregator.start(args.listen)
        except (ValueError, RuntimeError) as exc:  # not loopback, or the port is taken
            p.error(f"aggregator: {exc}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(2.0)
        await aggregator.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0
