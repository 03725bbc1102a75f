"""`thermoscope aggregator`: a node's aggregator (collector/node/aggregator.py) as its own process.

Its node's agents point at it (`THERMOSCOPE_COLLECTOR=127.0.0.1:PORT`) instead of the job's
collector; it forwards one merged frame per step to `--collector`, proving itself there as the
agents do (their `THERMOSCOPE_TOKEN`, `THERMOSCOPE_TOKEN_FILE`, `THERMOSCOPE_TLS*` variables), and
takes the ranks that present a token of `--tokens` (default: its own token).
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
    a.add_argument(
        "--tokens",
        metavar="FILE",
        help="bearer tokens the node's ranks must present (`TOKEN [JOB_PREFIX]` lines, as the "
        "collector's); default: the aggregator's own token, if it has one",
    )


def main(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from thermoscope.agent.security import resolve
    from thermoscope.collector.ingest.grpc_auth import TokenTable
    from thermoscope.collector.node.aggregator import Aggregator  # grpc only when this verb runs

    if args.ranks < 1:
        p.error(f"aggregator: --ranks must be at least 1, got {args.ranks}")
    try:  # upstream, it proves itself as an agent does: the agents' environment variables
        tokens = None if args.tokens is None else TokenTable.load(args.tokens)
        aggregator = Aggregator(args.collector, args.ranks, security=resolve(), tokens=tokens)
    except ValueError as exc:  # a file it cannot read, a certificate without its key (AuthConfigError too)
        p.error(f"aggregator: {exc}")

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
