"""What one sampled step says about a model: the sufficient statistics, as host arrays.

A `Sample` is produced by the agent's sampler (one rank), travels as a wire `Frame`, and
is produced again by the collector's merge (all ranks and shards of a job). Every field is
mergeable, so the derivation downstream never needs the raw tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from . import saved as checked


@dataclass(frozen=True)
class LayerInfo:
    """One named parameter tensor (or this rank's shard of it)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype: str
    shard_index: int = 0
    shard_count: int = 1
    hist_lo: float = -1.0  # fixed histogram edges [lo, hi) for the run
    hist_hi: float = 1.0


@dataclass(frozen=True)
class SiteInfo:
    """One activation site: a module computing a = phi(z). `function` is phi with its
    parameters, as its engine type is read against (e.g. "ReLU6()", "LeakyReLU(negative_slope=0.2)",
    "gelu(approximate='tanh')"); "" where the agent did not say (an earlier release's)."""

    name: str
    kind: str
    function: str = ""


@dataclass(frozen=True)
class Table:
    """The layers and sites one part's samples report, row by row: a rank's, whose every entry
    is one shard (`of_rank`), or a node aggregator's, whose entries are runs of the shards its
    ranks hold: `layers[i]` covers shards `shard_index .. shard_index + spans[i] - 1` of its
    layer's `shard_count`, and its `numel` counts the values of all of them."""

    layers: tuple[LayerInfo, ...]
    spans: tuple[int, ...]
    sites: tuple[SiteInfo, ...]

    @classmethod
    def of_rank(cls, layers: list[LayerInfo], sites: list[SiteInfo]) -> Table:
        return cls(tuple(layers), (1,) * len(layers), tuple(sites))

    @classmethod
    def of_node(cls, tables: dict[int, Table]) -> Table:
        """The table a node aggregator forwards for its ranks' `tables`: each layer's shards held
        on the node, one entry per run of consecutive shard indices (a replica: one entry), in
        the order the ranks name them (lowest rank first); each site once."""
        held: dict[str, dict[int, LayerInfo]] = {}
        sites: dict[str, SiteInfo] = {}
        for rank in sorted(tables):
            for layer in tables[rank].layers:
                held.setdefault(layer.name, {}).setdefault(layer.shard_index, layer)
            for site in tables[rank].sites:
                sites.setdefault(site.name, site)
        layers, spans = [], []
        for shards in held.values():
            runs: list[list[int]] = []
            for i in sorted(shards):
                if runs and runs[-1][-1] == i - 1:
                    runs[-1].append(i)
                else:
                    runs.append([i])
            for run in runs:
                first = shards[run[0]]
                numel = sum(shards[i].numel for i in run)
                layers.append(replace(first, numel=numel))
                spans.append(len(run))
        return cls(tuple(layers), tuple(spans), tuple(sites.values()))


#: LayerStats's columns a sample may lack: the histogram (not taken every sample) and what was
#: added after the first release (NaN where absent).
OPTIONAL_LAYER_COLUMNS = ("histogram", "update_sq")


@dataclass(frozen=True)
class LayerStats:
    """Per-layer columns: moments of the values at step t and the two work dot products."""

    count: np.ndarray  # int64
    mean: np.ndarray  # float64
    m2: np.ndarray  # float64, sum of squared deviations
    # the previous sampled update t (0 at the first sample), with the next step's gradient g_{t+1}:
    dot_before: np.ndarray  # float64, <g_{t+1}, theta_t> (theta_t estimated on k of n coordinates)
    dot_after: np.ndarray  # float64, <g_{t+1}, theta_{t+1}>
    histogram: np.ndarray | None  # int64 (layers, bins + 2): below lo, the bins, at/above hi; None: not taken
    # float64, sum over the layer of (theta_{t+1} - theta_t)^2: this sampled step's own update, the
    # findings' update-to-weight ratio (a frozen layer's 0, an exploding one's jump). Added after
    # the columns above: a sample made without it (an older agent's frame, a state saved before
    # it) reads NaN, "not sent", never 0, "did not move".
    update_sq: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.update_sq is None:
            object.__setattr__(self, "update_sq", np.full(len(self.count), np.nan))

    @property
    def work(self) -> np.ndarray:
        """w+_{l,t} = <g_{t+1}, theta_{t+1} - theta_t>: the expected energy change caused by the
        previous sampled update of layer l (unbiased by the minibatch noise: docs/science.md section 2)."""
        return self.dot_after - self.dot_before

    def __len__(self) -> int:
        return len(self.count)


@dataclass(frozen=True)
class SiteStats:
    """Per-site columns: moments of the pre-activations z and activations a."""

    count: np.ndarray  # int64
    in_mean: np.ndarray
    in_m2: np.ndarray
    out_mean: np.ndarray
    out_m2: np.ndarray
    probe_spread: np.ndarray  # float64 engine-type probe; negative: not probed

    def __len__(self) -> int:
        return len(self.count)

    def padded(self, n: int) -> SiteStats:
        """These sites followed by sites that made no value, `n` in all: a sample taken before
        sites joined its table (a site table only grows), read against the grown table. (Fewer
        than it has: the first `n`, for a stream that cannot declare the others.)"""
        extra = n - len(self.count)
        if extra < 0:
            return SiteStats(*(getattr(self, f.name)[:n] for f in fields(self)))
        if extra == 0:
            return self
        zeros = np.zeros(extra)
        return SiteStats(
            np.concatenate([self.count, np.zeros(extra, dtype=np.int64)]),
            *(np.concatenate([c, zeros]) for c in (self.in_mean, self.in_m2, self.out_mean, self.out_m2)),
            np.concatenate([self.probe_spread, np.full(extra, -1.0)]),
        )


@dataclass(frozen=True)
class Sample:
    """Statistics of one sampled optimizer step."""

    step: int
    wall_time: float
    energy: float  # NaN when the training loop gave no loss
    layers: LayerStats
    sites: SiteStats

    @property
    def has_energy(self) -> bool:
        return not math.isnan(self.energy)

    def with_sites(self, n: int) -> Sample:
        """The sample read against a site table grown to `n` sites (`SiteStats.padded`)."""
        return self if len(self.sites) == n else replace(self, sites=self.sites.padded(n))

    def to_state(self) -> dict[str, Any]:
        """The sample as plain named values, as a saved state holds it (`from_state` reads it
        back): its step, wall time and energy, and its layers' and sites' columns by name (no
        histogram where none was taken)."""
        return {
            "step": self.step,
            "wall_time": self.wall_time,
            "energy": self.energy,
            "layers": {f.name: getattr(self.layers, f.name) for f in fields(LayerStats)},
            "sites": {f.name: getattr(self.sites, f.name) for f in fields(SiteStats)},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], layers: int = -1, sites: int = -1) -> Sample:
        """The sample `to_state` gave (its arrays as they are: a sample is never written to), of
        `layers` layers and `sites` sites (-1: as many as its columns say); ValueError if its
        columns do not fit together."""
        layer_v, site_v = state["layers"], state["sites"]
        layer_columns = [f.name for f in fields(LayerStats) if f.name not in OPTIONAL_LAYER_COLUMNS]
        n = len(checked.array(layer_v["count"], (layers,), "sample.layers.count"))
        m = len(checked.array(site_v["count"], (sites,), "sample.sites.count"))
        histogram, update_sq = layer_v.get("histogram"), layer_v.get("update_sq")
        return cls(
            step=int(state["step"]),
            wall_time=float(state["wall_time"]),
            energy=float(state["energy"]),
            layers=LayerStats(
                *(checked.array(layer_v[c], (n,), f"sample.layers.{c}") for c in layer_columns),
                None if histogram is None else checked.array(histogram, (n, -1), "sample.layers.histogram"),
                None if update_sq is None else checked.array(update_sq, (n,), "sample.layers.update_sq"),
            ),
            sites=SiteStats(
                *(checked.array(site_v[f.name], (m,), f"sample.sites.{f.name}") for f in fields(SiteStats))
            ),
        )
