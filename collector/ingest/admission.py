"""Which jobs stream at all: attach and detach (`Admission`).

A default for every job and a choice per job over it; with a store, both are kept for a
restarted collector (`EventStore.save_admission`), which starts from what it was last told.
The servicer tells each open stream of a job whose state changed (`Telemetry.admit`).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..state.store import EventStore


class Admission:
    """Whether each job's agents should stream (not paused)."""

    def __init__(self, active: bool, store: EventStore | None) -> None:
        """`active`: the default (False: every job paused until attached), unless `store` holds
        what a collector before on this database was told."""
        self.store = store
        self.default = active
        self.overrides: dict[str, bool] = {}  # per-job choices, over the default
        if store is not None:
            default, self.overrides = store.load_admission()
            self.default = active if default is None else default

    def active(self, job_id: str) -> bool:
        """Whether the job's agents should stream (not paused)."""
        return self.overrides.get(job_id, self.default)

    def set(self, job_id: str | None, active: bool, watched: Iterable[str]) -> list[str]:
        """Attach (`active`) or detach one job, or every job (None: set the default, drop the
        per-job choices); the jobs among `watched` whose state changed."""
        watched = set(watched)
        before = {j: self.active(j) for j in watched}
        if job_id is None:
            self.default = active
            self.overrides.clear()
        else:
            self.overrides[job_id] = active
        if self.store is not None:  # kept for a restarted collector, from the next checkpoint
            self.store.save_admission(active if job_id is None else None, self.overrides)
        return [j for j in watched if self.active(j) != before[j]]
