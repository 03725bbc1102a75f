"""`thermoscope jobs`: the jobs a user can attach to or look at, by the names they know them by.

A Ray job id is opaque (`01000000`), and with the `ray` extra `ray list jobs` fails (it needs
`ray[default]`). This lists the jobs the collector sees, from its `/metrics` as `top` reads it
(with the run its agents named: a Ray Train run's name), and, given a Ray cluster (`--address`
or `$RAY_ADDRESS`), the Ray jobs running there with their entrypoints, from Ray's own job table:
one row per job id, whichever side knows it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from rich.console import Console
from rich.table import Table

from . import top
from .plain import plain

#: The families `jobs` reads: each job's run, phase, step and ranks.
FAMILIES = (
    "thermoscope_run_info",
    "thermoscope_phase",
    "thermoscope_last_step",
    "thermoscope_agents_connected",
    "thermoscope_rank_stale",
    "thermoscope_job_paused",
)


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """The `jobs` command and its flags."""
    j = sub.add_parser(
        "jobs",
        help="the jobs to attach to or look at: those the collector sees, and a Ray cluster's",
        description="One row per job: its id, the run its agents named (a Ray Train run's name), its "
        "phase, step and ranks as the collector's /metrics shows them, and, given a Ray cluster "
        "(--address or $RAY_ADDRESS), the Ray jobs running there with their entrypoints.",
    )
    top.reading_arguments(j)
    j.add_argument(
        "--address", help="a Ray cluster whose running jobs to list (default: $RAY_ADDRESS; neither: none)"
    )


def main(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """`thermoscope jobs`: 0 when the collector (or the Ray cluster asked) could be read, else 1
    with the reason on stderr, one line."""
    src = top.source(args, p, "jobs")
    address = args.address or os.environ.get("RAY_ADDRESS")
    running: dict[str, str] = {}
    if address:
        from . import attach

        attach.join("jobs --address", address)
        running = attach.running_jobs()
    try:
        seen = src.read(families=FAMILIES)
        problem = None
    except (top.TopError, top.Unreachable) as exc:
        seen, problem = {}, str(exc)
    if problem is not None:
        print(f"thermoscope jobs: {problem}", file=sys.stderr)
        if not address:
            return 1
    console = Console() if Console().is_terminal else Console(width=1000)
    console.print(table(seen, running, bool(address)))
    return 0


def table(seen: dict[str, top.Job], running: dict[str, str], ray: bool) -> Table | str:
    """The rows: every job id either side knows, sorted; `ray`: whether a cluster was asked."""
    ids = sorted(set(seen) | set(running))
    if not ids:
        return "no job: the collector sees none" + (", and none runs on the Ray cluster" if ray else "")
    t = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 2, 0, 0))
    for name in ("job", "run", "phase", "step", "ranks", *(("entrypoint",) if ray else ())):
        t.add_column(name, overflow="fold")
    for job_id in ids:
        job = seen.get(job_id)
        if job is None:  # running on Ray, not (yet) streaming: `attach --job` it
            cells = ["—", "—", "—", "not streaming"]
        else:
            cells = [
                job.run or "—",
                job.phase or "—",
                "—" if math.isnan(job.step) else str(int(job.step)),
                top.ranks(job),
            ]
        t.add_row(
            plain(job_id),
            *(plain(c) if isinstance(c, str) else c for c in cells),
            *((plain(running.get(job_id, "—")),) if ray else ()),
        )
    return t
