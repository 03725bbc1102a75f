"""`thermoscope replay`: deliver the frames dead agent processes left in a spool directory.

A monitor given `spool=DIR` keeps what its collector did not make durable in DIR when it closes
(or dies); the next monitor with that spool replays it on its first stream. This delivers it
without one: after a job ended, or from a node whose training will not run again. Each leftover
spool goes on a stream of its own, with the hello it was written for; the collector
de-duplicates, so a frame it already holds is counted once. Prints one line per spool, and
exits 1 if any frame is still not durable (its spool stays, for another try).
"""

from __future__ import annotations

import argparse
import os
import threading

from thermoscope.agent.relay import Relay
from thermoscope.agent.replay import replay
from thermoscope.agent.security import resolve
from thermoscope.agent.spool import Spool
from thermoscope.wire.contract import DEFAULT_GRPC


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """The `replay` command and its flags."""
    r = sub.add_parser(
        "replay",
        help="deliver the frames dead agents left in a spool directory to a collector",
        description="The token and TLS settings come from the agents' environment variables "
        "($THERMOSCOPE_TOKEN or $THERMOSCOPE_TOKEN_FILE, $THERMOSCOPE_TLS_CA, $THERMOSCOPE_TLS_CERT, "
        "$THERMOSCOPE_TLS_KEY, $THERMOSCOPE_TLS).",
    )
    r.add_argument("--spool", required=True, metavar="DIR", help="the agents' spool directory")
    r.add_argument(
        "--collector",
        default=os.environ.get("THERMOSCOPE_COLLECTOR") or DEFAULT_GRPC,
        metavar="HOST:PORT",
        help=f"the collector's gRPC address (default $THERMOSCOPE_COLLECTOR, else {DEFAULT_GRPC})",
    )
    r.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the collector (default 10)"
    )


def main(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    if not os.path.isdir(args.spool):
        p.error(f"replay: {args.spool} is not a directory")
    if not args.timeout > 0:
        p.error(f"replay: --timeout must be a positive number of seconds, got {args.timeout}")
    try:
        security = resolve()
    except ValueError as exc:
        p.error(f"replay: {exc}")
    leftovers = Spool.leftovers(args.spool)
    if not leftovers:
        print(f"nothing to replay in {args.spool}")
        return 0
    print(f"{len(leftovers)} spool(s) to replay to {args.collector}")
    relay, stopping = Relay(security, (0.2, 2.0)), threading.Event()
    try:
        if not relay.connect(args.collector, args.timeout, stopping.wait, stopping):
            print(f"no collector answering at {args.collector} within {args.timeout:g} s; nothing replayed")
            return 1
        complete = True
        for i, path in enumerate(leftovers, 1):
            done = replay(relay, path, stopping)
            complete &= done.complete
            print(f"[{i}/{len(leftovers)}] {path.name}: {done}", flush=True)
        return 0 if complete else 1
    finally:
        relay.close()
