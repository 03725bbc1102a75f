"""Which runs of which jobs the collector holds in memory, and which run a job shows.

Each run of a job (`Hello.run_id`) is its own `Job`: its merge, phases, counters, marks and
checkpoint, so two runs under one job id (Ray numbers jobs per cluster; a stray process naming
the job) never evict or mix with each other. A job shows one *current* run in /metrics and
snapshots: the first to stream, until another run streams while it does not (`follow`).

Held runs are bounded (`Limits.max_jobs`, and `max_jobs_per_token` per tenant: the bearer token
or client certificate that opened the run): a new run lets go of the runs whose streams ended
longest ago, once their state is in the store; when every held run still streams, it is
refused. A run let go resumes from the store if its agents come back (checkpoint.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from thermoscope.wire.codec import WireError

from ..settings import Limits
from .job import Job

log = logging.getLogger("thermoscope.collector")

Key = tuple[str, str]  # (job id, run id)


class Runs:
    """The runs held, by (job, run); `current`: each job's shown run, by job id."""

    def __init__(self, current: dict[str, Job], limits: Limits, durable: bool) -> None:
        """`current`: the collector's job table, kept here; `durable`: whether a store holds
        the runs' state (then a run is let go only once checkpointed)."""
        self.current = current
        self.limits = limits
        self.durable = durable
        self.held: dict[Key, Job] = {}
        self.tenants: dict[Key, str] = {}  # run -> who opened it

    def get(self, key: Key) -> Job | None:
        return self.held.get(key)

    def of(self, job_id: str) -> Iterator[Job]:
        """Every held run of a job."""
        return (run for (j, _), run in self.held.items() if j == job_id)

    def hold(self, job: Job, tenant: str) -> list[str]:
        """Hold a new run, within the bounds (`make_room`: WireError `too_many_jobs` when they
        are full of streaming runs). A job without a current run shows it. Returns the job
        ids that left with the runs let go."""
        gone = self._make_room(job.job_id, tenant)
        key = (job.job_id, job.run_id)
        self.held[key], self.tenants[key] = job, tenant
        self.current.setdefault(job.job_id, job)
        return gone

    def check_room(self, job_id: str, tenant: str) -> None:
        """WireError `too_many_jobs` if a new run of `job_id` could not be held."""
        for owner, limit, holder in self._bounds(tenant):
            held = self._held_by(owner)
            if len(held) >= limit and not any(self._evictable(self.held[key]) for key in held):
                raise WireError(
                    "too_many_jobs",
                    f"{holder} {len(held)} runs, its limit, all streaming; job {job_id!r} is refused",
                )

    def follow(self, job: Job) -> list[str]:
        """A run that is not its job's current one sent a frame: it becomes current unless the
        current run still streams (two live runs of one job: the first keeps /metrics, the
        other is merged and checkpointed all the same)."""
        current = self.current.get(job.job_id)
        if current is job or (current is not None and current.streaming()):
            return []
        self.current[job.job_id] = job
        log.info("job %s: run %r streams now", job.job_id, job.run_id)
        return self.forget_ended(job.job_id)

    def forget_ended(self, job_id: str) -> list[str]:
        """Let go of the job's ended runs that are not current (the store holds them)."""
        current = self.current.get(job_id)
        ended = [key for key, run in self.held.items() if key[0] == job_id and run is not current]
        return [gone for key in ended if self._evictable(self.held[key]) for gone in self._forget(key)]

    def _bounds(self, tenant: str) -> list[tuple[str | None, int, str]]:
        bounds: list[tuple[str | None, int, str]] = [(None, self.limits.max_jobs, "the collector keeps")]
        if tenant:
            bounds.append((tenant, self.limits.max_jobs_per_token, "its token holds"))
        return bounds

    def _held_by(self, owner: str | None) -> list[Key]:
        return [key for key in self.held if owner is None or self.tenants[key] == owner]

    def _evictable(self, job: Job) -> bool:
        """No stream of the run is open, and its state is in the store (or there is none)."""
        return not job.open_streams and not (self.durable and job.dirty)

    def _make_room(self, job_id: str, tenant: str) -> list[str]:
        """Within each bound, let go of the runs that ended longest ago (WireError when too few
        have ended)."""
        self.check_room(job_id, tenant)
        gone = []
        for owner, limit, _ in self._bounds(tenant):
            held = self._held_by(owner)
            ended = sorted((self.held[key].ended_at, key) for key in held if self._evictable(self.held[key]))
            for _, key in ended[: max(0, len(held) - limit + 1)]:
                log.info("job %s run %r: ended long ago, let go to hold job %s", *key, job_id)
                gone += self._forget(key)
        return gone

    def _forget(self, key: Key) -> list[str]:
        """Let a run go; its job shows another held run, or leaves (its id returned)."""
        job = self.held.pop(key)
        del self.tenants[key]
        if self.current.get(job.job_id) is not job:
            return []
        others = list(self.of(job.job_id))
        if others:
            self.current[job.job_id] = max(others, key=lambda run: run.merged_step)
            return []
        del self.current[job.job_id]
        return [job.job_id]
