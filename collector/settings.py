"""Every default of the collector, written once: `DEFAULTS`.

The command line's `default=`s (and the defaults its --help prints), `Collector`'s keyword
defaults, the servicer's `Limits`, the Ray actor's `start` and `thermoscope attach` all read
them from here, so a default changed here changes everywhere at once. The listen addresses
come from the wire contract, which the agents read too. The phase detector's thresholds are
the detector's own (`science.detect.Settings`, measured by `tests/bench/bench_detection.py`).

Paths follow the XDG base directories: `$XDG_STATE_HOME` (default `~/.local/state`), read
once at import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from thermoscope.science.derive import WINDOW
from thermoscope.wire.contract import DEFAULT_GRPC, DEFAULT_METRICS, split_address

#: Where the collector keeps its database and the Ray actor its service-discovery file.
STATE_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "thermoscope"


@dataclass(frozen=True)
class Limits:
    """Bounds on what agents may make the collector hold; each refusal has its reason.

    `max_layers`: layers (and, separately, sites) a job may declare over all its ranks
    (RESOURCE_EXHAUSTED `too_many_layers`); `max_name_length`: characters in any name a hello
    carries (INVALID_ARGUMENT `name_too_long`); `max_jobs`: runs of jobs the collector holds in
    memory (each run of a job counts; a run whose streams all ended, once checkpointed, is let
    go to make room, longest ended first; a hello of a new run when every held run streams:
    RESOURCE_EXHAUSTED `too_many_jobs`); `max_jobs_per_token`: the same bound per bearer token
    (or client certificate), so one tenant cannot fill the collector; `max_frame_rate`: frames
    per second one stream may send, a token bucket holding one second of frames (beyond it the
    stream ends with RESOURCE_EXHAUSTED `rate_limited`; the agent backs off, reconnects and
    resends what was not acked, so nothing is lost and the collector's work stays bounded);
    `max_ranks`: the world size a hello may claim (RESOURCE_EXHAUSTED `too_many_ranks`), which
    bounds every per-rank table of a job.
    """

    max_layers: int = 10_000
    max_name_length: int = 256
    max_jobs: int = 1_000
    max_frame_rate: float = 1_000.0
    max_ranks: int = 16_384
    max_jobs_per_token: int = 250

    def __post_init__(self) -> None:
        names = (
            "max_layers",
            "max_name_length",
            "max_jobs",
            "max_frame_rate",
            "max_ranks",
            "max_jobs_per_token",
        )
        for name in names:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class CollectorSettings:
    """The collector's settings, named like the flags of `thermoscope collector`.

    `grpc`, `metrics`: listen addresses; `window`: samples per temperature window; `every`:
    the sampling interval asked of agents (0: theirs); `stale_after`: seconds an agent may send
    nothing (its job not paused) before its rank is stale; `max_message_bytes`: the largest
    accepted message; `limits`: bounds on input (`Limits`); `max_series_per_job`: layer (site)
    series per job and metric in /metrics, the rest folded into `__other__`; `phase_layers`:
    layers per job with a phase state-set; `db`: the SQLite file of events, history and
    checkpoints (None: keep none); `history_interval`: least seconds between two history rows of
    a job (0: every merged sample); `retention`: seconds of history kept (older rows are deleted
    and their pages given back; 0: keep all); `checkpoint_interval`: seconds between two checkpoints;
    `sd_file`: the Ray actor's Prometheus file-SD JSON; `actor_timeout`: seconds to wait for the
    Ray actor to answer; `keepalive`: seconds between the gRPC server's HTTP/2 pings on a
    connection, `keepalive_timeout`: seconds it waits for the answer before it closes the
    connection, so the streams of a client that stopped answering (frozen, its host gone) end and
    release what they held within `keepalive + keepalive_timeout` (`ingest/keepalive.py`).

    `Collector` takes one (`settings=`), or the flat keywords of `thermoscope collector`'s flags
    (`window=`, `max_jobs=`, ...), which `with_flat` turns into one.
    """

    grpc: str = DEFAULT_GRPC
    metrics: str = DEFAULT_METRICS
    window: int = WINDOW
    # The one default of the interval the collector asks for. 0 asks for nothing: each agent
    # keeps its own (`agent.settings.Sampling.every`, 10), so a collector started without
    # --every never overrides what a training chose.
    every: int = 0
    stale_after: float = 60.0
    max_message_bytes: int = 16 << 20
    limits: Limits = field(default_factory=Limits)
    max_series_per_job: int = 2_000
    phase_layers: int = 50
    db: str | Path | None = STATE_DIR / "events.db"
    history_interval: float = 1.0
    # A week: a post-mortem's worth (`thermoscope export` keeps a job for longer), at most ~600k
    # rows per job at one row a second.
    retention: float = 7 * 86400.0
    checkpoint_interval: float = 5.0
    sd_file: Path = STATE_DIR / "file_sd.json"
    actor_timeout: float = 60.0
    keepalive: float = 30.0
    keepalive_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("stale_after", "checkpoint_interval", "keepalive", "keepalive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def with_flat(self, **flat: Any) -> CollectorSettings:
        """These settings with the flat keywords of `Collector` and the command line changed:
        the names of `Limits`' fields (`max_jobs=`, ...) go to `limits`, the rest are this
        class's own (an unknown name is a TypeError)."""
        limits = {name: flat.pop(name) for name in LIMITS if name in flat}
        return replace(self, limits=replace(self.limits, **limits), **flat)

    @property
    def grpc_port(self) -> int:
        """The port of `grpc`: where the Ray actor listens unless told otherwise."""
        return split_address(self.grpc)[1]

    @property
    def metrics_port(self) -> int:
        """The port of `metrics`."""
        return split_address(self.metrics)[1]


#: The names of `Limits`' fields: the flat keywords `CollectorSettings.with_flat` gives to `limits`.
LIMITS = tuple(f.name for f in fields(Limits))

DEFAULTS = CollectorSettings()
