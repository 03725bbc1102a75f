"""`thermoscope export`: one job's history and phase events, out of a collector's database, into a
JSON lines file a post-mortem reads with pandas (`pandas.read_json(path, lines=True)`).

The database keeps history for `--retention` only; an export is how a job's readings outlive it.
One JSON object a line, `record` saying which kind (docs/usage.md, "Exporting a job"):

- `"history"`: `job`, `step`, `time` (Unix s), `energy`, `entropy`, `temperature`,
  `energy_from_work`, and one `layer_temperature.<layer>` per layer (pandas' `json_normalize`
  names); null where a value is undefined (NaN) or infinite.
- `"event"`: a phase transition, the fields of `thermoscope events --json`.

History rows come in step order, then the events in time order. The file is written beside its
final name and renamed into place, and an existing file is never overwritten: an export that
fails (a full disk, a wrong job) leaves nothing half-written and loses nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from thermoscope.collector.state.store import EventStore, History

#: The file kinds `--out` may name.
SUFFIXES = (".jsonl", ".ndjson")


def run(args: argparse.Namespace) -> int:
    """Export `args.job` from `args.db` to `args.out`; raises ValueError (no such job, a bad or
    existing --out) or FileNotFoundError (no database) with the reason."""
    out = Path(args.out)
    if out.suffix not in SUFFIXES:
        raise ValueError(f"--out must name a JSON lines file ({', '.join(SUFFIXES)}), got {out}")
    if out.exists():
        raise ValueError(f"{out} exists; name another file (an export never overwrites one)")
    store = EventStore(args.db, create=False)
    try:
        history = store.history(args.job)
        events = store.query(job=args.job)
    finally:
        store.close()
    partial = out.with_name(f".{out.name}.partial")
    try:
        with partial.open("w") as f:
            for row in rows(history):
                f.write(json.dumps(row) + "\n")
            for event in events:
                f.write(json.dumps({"record": "event", **event.as_dict()}) + "\n")
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    print(f"{len(history.step)} history rows and {len(events)} events of job {args.job} written to {out}")
    return 0


def rows(history: History):
    """The history's records, one a step (NaN and infinities as None: JSON has neither)."""
    for i, step in enumerate(history.step):
        row = {
            "record": "history",
            "job": history.job,
            "step": int(step),
            "time": _value(history.time[i]),
            "energy": _value(history.energy[i]),
            "entropy": _value(history.entropy[i]),
            "temperature": _value(history.temperature[i]),
            "energy_from_work": history.energy_from_work,
        }
        for name, t in zip(history.layer_names, history.layer_temperature[i], strict=True):
            row[f"layer_temperature.{name}"] = _value(t)
        yield row


def _value(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
