"""`thermoscope events`: the phase transitions a collector stored, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime, timezone

from rich.console import Console
from rich.table import Table

from thermoscope.collector.state.store import FIELDS, EventStore

from .plain import plain


def since(text: str) -> float:
    """Unix seconds, or an ISO 8601 date-time (UTC unless it names a zone)."""
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be Unix seconds or an ISO 8601 date-time such as 2026-11-27T10:00:00, got {text!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite time, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Print the events; raises FileNotFoundError when there is no database at --db."""
    store = EventStore(args.db, create=False)
    try:
        events = store.query(job=args.job, since=args.since)
    finally:
        store.close()
    if args.json:
        print(json.dumps([e.as_dict() for e in events]))
        return 0
    table = Table(title=plain(f"{len(events)} phase transitions in {args.db}"))
    for name in FIELDS:
        table.add_column(name, justify="right" if name in ("step", "confidence") else "left")
    for e in events:
        stamp = _stamp(e.time)
        table.add_row(  # what agents named (a job, a layer) as plain text: no markup, no escapes
            *map(plain, (e.job, e.scope, e.layer, str(e.step), stamp, e.from_, e.to, e.statistic)),
            f"{e.confidence:.3f}",
        )
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not squeeze the columns into 80 characters
        console = Console(width=200)
    console.print(table)
    return 0


def _stamp(seconds: float) -> str:
    """The UTC date-time of `seconds`, or the number itself where no calendar date is (a database
    an older collector filled from an agent with a broken clock may hold 1e300: it is listed, not
    a crash for every reader)."""
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g} s (no date)"
