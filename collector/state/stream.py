"""`Stream`: one connected agent as the collector knows it, from its hello and its frames. Its own
module because both the job (liveness, marks) and the pipeline (which steps are complete) read it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from thermoscope.science.stats import LayerInfo, SiteInfo


@dataclass
class Stream:
    """One connected agent."""

    job_id: str
    run_id: str
    rank: int
    world_size: int
    host: str
    local_rank: int
    node: str
    layers: list[LayerInfo]
    sites: list[SiteInfo]
    bins: int
    last_step: int = -1
    last_seq: int = 0
    frames: int = 0
    heard: float = field(default_factory=time.monotonic)  # when it last sent (or was unpaused)
    stale: bool = False  # stale at the last look: its silence was counted in `lost_total`
    # A node aggregator's stream (docs/ray.md): the ranks it speaks for (empty: one rank's), its
    # table's runs of shards, and when each rank was last named in its frames, stale at the last look.
    ranks: tuple[int, ...] = ()
    spans: tuple[int, ...] = ()
    rank_heard: dict[int, float] = field(default_factory=dict)
    stale_ranks: set[int] = field(default_factory=set)
    # Where it runs, as the cluster's exporters name it (agent/placement.py): "" where unknown.
    pod: str = ""
    gpu: str = ""
