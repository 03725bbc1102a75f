"""The `thermoscope` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import sqlite3
import sys

from thermoscope.collector.credentials import AuthConfigError
from thermoscope.collector.security import InsecureError
from thermoscope.collector.service import Collector, ListenError
from thermoscope.collector.settings import DEFAULTS
from thermoscope.collector.state.store import StoreError
from thermoscope.science.theory import INITS, LOSSES, ProblemError
from thermoscope.wire.contract import split_address

from . import attach as attach_cli
from . import events as events_cli
from . import extras
from . import security as security_cli


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _address(text: str) -> str:
    """A listen address: HOST:PORT, or a bare PORT on 127.0.0.1 (listening beyond loopback takes
    naming the host, so a port alone never exposes the collector)."""
    address = f"127.0.0.1:{text}" if text.isdigit() else text
    try:
        split_address(address)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; a bare PORT means 127.0.0.1:PORT") from None
    return address


_positive = _at_least(1)


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thermoscope", description="Thermodynamics of neural-network training.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collector", help="run the collector (gRPC ingest + Prometheus /metrics)")
    _collector_arguments(c)
    security_cli.add_arguments(c)
    attach_cli.add_arguments(sub, c)

    db = DEFAULTS.db
    g = sub.add_parser("plot", help="draw a job's run from the collector's database: its phase diagram")
    g.add_argument("--db", default=str(db), help=f"the collector's database (default {db})")
    g.add_argument("--job", help="the job id (default: the job with the newest history)")
    g.add_argument("--out", required=True, metavar="FILE.png", help="where to write the figure (PNG or SVG)")

    e = sub.add_parser(
        "events",
        help="list the phase transitions a collector detected",
        description="A running collector writes them at each checkpoint (--checkpoint-interval), "
        "so the newest show up within that interval.",
    )
    e.add_argument("--db", default=str(db), help=f"the collector's event database (default {db})")
    e.add_argument("--job", help="only this job id")
    e.add_argument(
        "--since", type=events_cli.since, help="only events at or after this time (Unix s or ISO 8601)"
    )
    e.add_argument("--json", action="store_true", help="print a JSON list of events and findings")
    e.add_argument(
        "--finding",
        type=events_cli.finding_name,
        metavar="NAME",
        help="only the findings of this name (e.g. dead_site)",
    )

    x = sub.add_parser(
        "export",
        help="write one job's history and phase events to a JSON lines file (pandas reads it)",
        description="For a post-mortem, or to keep a job past the collector's --retention: one JSON "
        "object a line, `record` history or event (docs/usage.md); read with "
        "pandas.read_json(FILE, lines=True).",
    )
    x.add_argument("--db", default=str(db), help=f"the collector's database (default {db})")
    x.add_argument("--job", required=True, help="the job id")
    x.add_argument("--out", required=True, metavar="FILE.jsonl", help="the file to write (never overwritten)")

    d = sub.add_parser(
        "demo", help="train a small model with a live agent and collector, then show the readings"
    )
    d.add_argument("--steps", type=_positive, default=1200, help="training steps (default 1200)")
    # the demo's one default: a short run samples more often than an agent does by default (10)
    d.add_argument("--every", type=_positive, default=5, help="sample one step in this many (default 5)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--serve", action="store_true", help="keep serving the page and /metrics after training until Ctrl-C"
    )
    d.add_argument("--figure", metavar="FILE.png", help="also draw the run's readings (needs matplotlib)")
    d.add_argument(
        "--shift-at", type=_at_least(0), help="step at which the data shift (default: half way; 0: never)"
    )
    d.add_argument("--db", help="keep the demo's phase events in this SQLite file (default: a temporary one)")
    d.add_argument(
        "--workers",
        type=_at_least(0),
        default=0,
        help="train as a Ray Train job of this many workers on a local Ray cluster (default 0: no Ray)",
    )

    t = sub.add_parser(
        "theory",
        help="predicted T_{I->II} of a linear model (docs/science.md section 7); --simulate measures it",
    )
    t.add_argument("--loss", choices=LOSSES, default="mse", help="training loss (default mse)")
    t.add_argument("--init", choices=INITS, default="normal", help="init distribution (default normal)")
    t.add_argument(
        "--scale", type=_positive_number, default=0.1, help="the init's standard deviation s (default 0.1)"
    )
    t.add_argument(
        "--target-scale",
        type=_positive_number,
        default=0.05,
        help="teacher weights' standard deviation b (default 0.05; for ce keep b sqrt(d) at a few at most)",
    )
    t.add_argument("--dim", type=_positive, default=1000, help="input dimension d (default 1000)")
    t.add_argument(
        "--samples", type=_positive, default=10000, help="training samples N (default 10000; >= d, ce > 2d)"
    )
    t.add_argument("--seed", type=_at_least(0), default=0, help="seed of the data and of the init draw")
    t.add_argument("--simulate", action="store_true", help="also train it with a Monitor and compare")
    t.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    from . import loadgen  # its own module: the load generator and its flags

    loadgen.add_arguments(sub)
    from . import top  # its own module: the live view and its flags

    top.add_arguments(sub)
    from . import jobs  # its own module: the jobs to attach to, by name

    jobs.add_arguments(sub)
    from . import aggregator  # its own module: a node's aggregator and its flags

    aggregator.add_arguments(sub)
    from . import replay  # its own module: delivering what dead agents left in a spool

    replay.add_arguments(sub)
    security_cli.add_password_command(sub)
    return p


def _collector_arguments(c: argparse.ArgumentParser) -> None:
    """The `thermoscope collector` flags of `Collector`'s settings, their defaults from `DEFAULTS`."""
    d, limits = DEFAULTS, DEFAULTS.limits
    c.add_argument(
        "--grpc",
        type=_address,
        default=d.grpc,
        help=f"gRPC listen HOST:PORT, or PORT on 127.0.0.1 (default {d.grpc})",
    )
    c.add_argument(
        "--metrics",
        type=_address,
        default=d.metrics,
        help=f"/metrics listen HOST:PORT, or PORT on 127.0.0.1 (default {d.metrics})",
    )
    c.add_argument(
        "--window",
        type=_at_least(2),
        default=d.window,
        help=f"samples per temperature window (default {d.window})",
    )
    c.add_argument(
        "--every", type=_at_least(0), default=d.every, help="sampling interval to ask agents for (0: theirs)"
    )
    c.add_argument(
        "--max-message-bytes", type=_positive, default=d.max_message_bytes, help="largest accepted message"
    )
    c.add_argument(
        "--max-layers",
        type=_positive,
        default=limits.max_layers,
        help=f"layers (and sites) per job (default {limits.max_layers})",
    )
    c.add_argument(
        "--max-name-length",
        type=_positive,
        default=limits.max_name_length,
        help=f"characters in a hello's names (default {limits.max_name_length})",
    )
    c.add_argument(
        "--max-jobs",
        type=_positive,
        default=limits.max_jobs,
        help="runs of jobs held in memory; the longest ended is let go for a new one, which is "
        f"refused when every held run streams (default {limits.max_jobs})",
    )
    c.add_argument(
        "--max-jobs-per-token",
        type=_positive,
        default=limits.max_jobs_per_token,
        help=f"the same bound per bearer token or client certificate (default {limits.max_jobs_per_token})",
    )
    c.add_argument(
        "--max-ranks",
        type=_positive,
        default=limits.max_ranks,
        help=f"world size a hello may claim (default {limits.max_ranks})",
    )
    c.add_argument(
        "--max-series-per-job",
        type=_at_least(2),
        default=d.max_series_per_job,
        help="layer (site) series per job and metric; the rest fold into one __other__ series "
        f"(default {d.max_series_per_job})",
    )
    c.add_argument(
        "--max-frame-rate",
        type=_positive_number,
        default=limits.max_frame_rate,
        metavar="HZ",
        help=f"frames per second one agent may send; beyond, its stream is refused "
        f"(default {limits.max_frame_rate:g})",
    )
    c.add_argument(
        "--keepalive",
        type=_positive_number,
        default=d.keepalive,
        metavar="S",
        help=f"seconds between the gRPC server's pings on a connection (default {d.keepalive:g})",
    )
    c.add_argument(
        "--keepalive-timeout",
        type=_positive_number,
        default=d.keepalive_timeout,
        metavar="S",
        help="seconds a client has to answer a ping before its connection is closed and its streams "
        f"release what they held (default {d.keepalive_timeout:g})",
    )

    c.add_argument("--db", default=str(d.db), help=f"SQLite file of phase events (default {d.db})")
    c.add_argument(
        "--phase-layers",
        type=_at_least(0),
        default=d.phase_layers,
        help=f"layers per job with a phase state-set (default {d.phase_layers})",
    )
    c.add_argument(
        "--stale-after",
        type=_positive_number,
        default=d.stale_after,
        metavar="S",
        help="seconds an agent may send nothing (its job not paused) before its rank is stale "
        f"(default {d.stale_after:g})",
    )
    c.add_argument(
        "--history-interval",
        type=_seconds,
        default=d.history_interval,
        metavar="S",
        help="least seconds between two rows of a job's history in --db, what `plot` draws "
        f"(default {d.history_interval:g}; 0: every merged sample)",
    )
    c.add_argument(
        "--retention",
        type=_seconds,
        default=d.retention,
        metavar="S",
        help="seconds of history kept in --db; older rows are deleted and their space given back "
        f"(default {d.retention:g}: a week; 0: keep all). `thermoscope export` saves a job for longer",
    )
    c.add_argument(
        "--checkpoint-interval",
        type=_positive_number,
        default=d.checkpoint_interval,
        metavar="S",
        help="seconds between two checkpoints of the jobs' state to --db "
        f"(default {d.checkpoint_interval:g}): a collector killed and restarted resumes from its last one "
        "and agents replay the frames after it from their spools; events and history reach --db at each "
        "checkpoint",
    )


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "collector":
        settings = {
            "window": args.window,
            "every": args.every,
            "max_message_bytes": args.max_message_bytes,
            "db": args.db,
            "phase_layers": args.phase_layers,
            "stale_after": args.stale_after,
            "history_interval": args.history_interval,
            "retention": args.retention,
            "checkpoint_interval": args.checkpoint_interval,
            "keepalive": args.keepalive,
            "keepalive_timeout": args.keepalive_timeout,
            "security": security_cli.from_args(args, p),
            "max_layers": args.max_layers,
            "max_name_length": args.max_name_length,
            "max_jobs": args.max_jobs,
            "max_jobs_per_token": args.max_jobs_per_token,
            "max_ranks": args.max_ranks,
            "max_series_per_job": args.max_series_per_job,
            "max_frame_rate": args.max_frame_rate,
        }
        if args.ray:
            try:
                return attach_cli.start(args, settings)
            except (AuthConfigError, InsecureError) as exc:
                p.error(f"collector --ray: {exc}")
        try:
            collector = Collector(args.grpc, args.metrics, **settings)
        except (AuthConfigError, InsecureError) as exc:
            p.error(f"collector: {exc}")
        except StoreError as exc:  # a database it must not run on: the reason, one line
            raise SystemExit(f"thermoscope collector: {exc}") from None
        try:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(collector.serve())
        except ListenError as exc:  # a port taken: the reason, one line (no usage: the flags were right)
            print(f"thermoscope collector: {exc}", file=sys.stderr)
            return 2
        except AuthConfigError as exc:  # at start: the /metrics TLS files
            p.error(f"collector: {exc}")
        return 0
    if args.command == "demo":
        extras.need("demo", "torch")
        if args.figure is not None:
            extras.need("demo --figure", "matplotlib")
        if args.workers:
            extras.need("demo --workers", "ray")
        from . import demo  # torch is imported only by the commands that train

        logging.getLogger("thermoscope").setLevel(logging.WARNING)
        try:
            demo.run(
                steps=args.steps,
                every=args.every,
                seed=args.seed,
                serve=args.serve,
                figure=args.figure,
                shift_at=args.shift_at,
                db=args.db,
                workers=args.workers,
            )
        except StoreError as exc:  # --db: a database it cannot use, one line naming it
            raise SystemExit(f"thermoscope demo: {exc}") from None
        return 0
    if args.command == "attach":
        try:
            return attach_cli.attach(args, security_cli.from_args(args, p))
        except (AuthConfigError, InsecureError) as exc:
            p.error(f"attach: {exc}")
    if args.command == "detach":
        return attach_cli.detach(args)
    if args.command == "hash-password":
        return security_cli.hash_password_line(args)
    if args.command == "plot":
        extras.need("plot", "matplotlib")
        from .plot import plot_job  # matplotlib is imported only by the commands that draw

        try:
            print(f"figure written to {plot_job(args.db, args.job, args.out)}")
            return 0
        except (FileNotFoundError, ValueError) as exc:
            p.error(f"plot: {exc}")
        except sqlite3.DatabaseError as exc:
            p.error(f"plot: {args.db} is not a Thermoscope database ({exc})")
    if args.command == "export":
        from . import export as export_cli

        try:
            return export_cli.run(args)
        except (FileNotFoundError, ValueError) as exc:
            p.error(f"export: {exc}")
        except sqlite3.DatabaseError as exc:
            p.error(f"export: {args.db} is not a Thermoscope database ({exc})")
    if args.command == "events":
        try:
            return events_cli.run(args)
        except FileNotFoundError as exc:
            p.error(f"events: {exc}")
        except sqlite3.DatabaseError as exc:
            p.error(f"events: {args.db} is not a Thermoscope event database ({exc})")
    if args.command == "loadgen":
        from . import loadgen

        return loadgen.main(args, p)
    if args.command == "aggregator":
        from . import aggregator

        return aggregator.main(args, p)
    if args.command == "replay":
        from . import replay

        return replay.main(args, p)
    if args.command == "top":
        from . import top

        return top.main(args, p)
    if args.command == "jobs":
        from . import jobs

        return jobs.main(args, p)
    if args.command == "theory":
        from . import theory as theory_cli  # torch is imported only with --simulate

        try:
            return theory_cli.run(args)
        except ProblemError as exc:
            p.error(f"theory: {exc}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
