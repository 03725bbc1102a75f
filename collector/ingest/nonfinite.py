"""The unusable values agents send (NaN/Inf; a wall time no clock could read): counted per job and
kind, never merged (`thermoscope_nonfinite_values_total{job_id,what}`), the first of each logged."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from ..state.stream import Stream

log = logging.getLogger("thermoscope.collector")


class NonFinite:
    """The counts, by (job id, what carried them), for /metrics to read."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def count(self, stream: Stream, step: int, counts: dict[str, int]) -> None:
        """Count the unusable values of an accepted frame of `stream` at `step` (what
        `codec.decode` found); log the first of each kind per job."""
        for what, n in counts.items():
            key = (stream.job_id, what)
            if key not in self.counts:
                log.warning(
                    "job %s rank %d: %d unusable (NaN/Inf or implausible) %s value(s) at step %d"
                    " (counted, not merged; logged once)",
                    stream.job_id,
                    stream.rank,
                    n,
                    what,
                    step,
                )
            self.counts[key] += n

    def forget(self, job_ids: Iterable[str]) -> None:
        """Jobs whose last held run was let go leave with their counts."""
        for job_id in job_ids:
            for counted in [k for k in self.counts if k[0] == job_id]:
                del self.counts[counted]
