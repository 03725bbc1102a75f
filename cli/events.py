"""`thermoscope events`: the phase transitions and findings a collector stored, as tables or JSON
(one list, in time order: a finding is the object with a `finding` key)."""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime, timezone

from rich.console import Console
from rich.table import Table

from thermoscope.collector.state.store import FIELDS, FINDING_FIELDS, EventStore
from thermoscope.science.findings import NAMES

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


def finding_name(text: str) -> str:
    """A finding's name, one of `findings.NAMES`."""
    if text not in NAMES:
        raise argparse.ArgumentTypeError(f"not a finding: {text!r} (one of {', '.join(NAMES)})")
    return text


def run(args: argparse.Namespace) -> int:
    """Print the events; raises FileNotFoundError when there is no database at --db.
    `--finding NAME`: that finding's records alone (no phase events)."""
    store = EventStore(args.db, create=False)
    try:
        events = [] if args.finding else store.query(job=args.job, since=args.since)
        findings = store.findings(job=args.job, since=args.since, finding=args.finding)
    finally:
        store.close()
    if args.json:
        listed = sorted([*(e.as_dict() for e in events), *findings], key=lambda d: d["time"])
        print(json.dumps(listed))
        return 0
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not squeeze the columns into 80 characters
        console = Console(width=200)
    if not args.finding:
        console.print(_transitions(args.db, events))
    console.print(_findings(args.db, findings))
    return 0


def _transitions(db: str, events: list) -> Table:
    table = Table(title=plain(f"{len(events)} phase transitions in {db}"))
    for name in FIELDS:
        table.add_column(name, justify="right" if name in ("step", "confidence") else "left")
    for e in events:
        stamp = _stamp(e.time)
        table.add_row(  # what agents named (a job, a layer) as plain text: no markup, no escapes
            *map(plain, (e.job, e.scope, e.layer, str(e.step), stamp, e.from_, e.to, e.statistic)),
            f"{e.confidence:.3f}",
        )
    return table


def _findings(db: str, findings: list[dict[str, object]]) -> Table:
    table = Table(title=plain(f"{len(findings)} findings in {db}"))
    for name in FINDING_FIELDS:
        table.add_column(name, justify="left" if name in ("job", "scope", "layer", "finding") else "right")
    for f in findings:
        cells = {k: "" if v is None else str(v) for k, v in f.items()}
        cells["time"] = _stamp(float(f["time"]))
        cells["confidence"] = f"{f['confidence']:.3f}"
        cells["value"] = "" if f["value"] is None else f"{f['value']:.4g}"
        table.add_row(*(plain(cells[k]) for k in FINDING_FIELDS))
    return table


def _stamp(seconds: float) -> str:
    """The UTC date-time of `seconds`, or the number itself where no calendar date is (a database
    an older collector filled from an agent with a broken clock may hold 1e300: it is listed, not
    a crash for every reader)."""
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g} s (no date)"
