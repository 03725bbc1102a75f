"""Merge the ranks and shards of a job into one sample per step: `merge_step`.

Each rank's Hello fixes its layer table. A layer name held whole by several ranks (data
parallel replicas) is counted once, from the lowest rank; a layer split into shards
(FSDP, ZeRO: `Shard{index, count}`) is the exact Chan merge of one copy of each shard, and
its work dots add up. A layer missing a shard at a step is NaN for that step. Energy is the
mean of the ranks' losses; activation sites pool every rank's batch. Which steps merge when is
the job's pipeline's (pipeline.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from thermoscope.science import physics
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats

#: Plans a job keeps (one per set of ranks that sent a step; usually one): more are dropped.
MAX_PLANS = 8

Tables = dict[int, tuple[list[LayerInfo], list[SiteInfo]]]


@dataclass(frozen=True, eq=False)
class MergePlan:
    """What merging a step of one set of ranks takes from their tables alone, worked out once.

    The tables change only when a rank says hello, while a job merges a step every second or
    more often: the destinations, the replica de-duplication (`np.unique`) and the expected
    shard coverage would otherwise be recomputed at every step, over Python lists of every
    layer. `merge_step` applies a plan; `MergePlans` keeps a job's.
    """

    ranks: tuple[int, ...]
    tables: tuple[tuple[list[LayerInfo], list[SiteInfo]], ...]  # the ranks' entries: compared by identity
    layer_names: list[str]
    site_names: list[str]
    #: per rank that contributes: (rank, its kept layer rows or None: all, their job layers or
    #: None: its rows are the job's layers in order)
    rows: tuple[tuple[int, np.ndarray | None, np.ndarray | None], ...]
    dest: np.ndarray  # the kept rows' job layers, in the order of `rows`
    nan_if_missing: np.ndarray  # NaN where a layer misses a shard, else 1
    site_dest: np.ndarray  # every rank's site rows' job sites, in rank order
    #: where each moment `merge_step` merges goes, in one group array: the kept layer rows to
    #: their layers, then every rank's sites' inputs and outputs to theirs (offset past the layers)
    moment_dest: np.ndarray

    @classmethod
    def build(
        cls, ranks: tuple[int, ...], tables: Tables, layer_names: list[str], site_names: list[str]
    ) -> MergePlan:
        """The plan for a step sent by `ranks` (sorted), from scratch."""
        layer_pos = {name: j for j, name in enumerate(layer_names)}
        site_pos = {name: j for j, name in enumerate(site_names)}
        # Layers: one contribution per (layer, shard index), from the lowest rank holding it.
        dest, shard, shards, offsets = [], [], [], [0]
        for r in ranks:
            layers = tables[r][0]
            dest.append([layer_pos[layer.name] for layer in layers])
            shard.append([layer.shard_index for layer in layers])
            shards.append([layer.shard_count for layer in layers])
            offsets.append(offsets[-1] + len(layers))
        dest_a, shard_a, shards_a = (np.concatenate(x).astype(np.int64) for x in (dest, shard, shards))
        width = int(shards_a.max()) + 1
        _, first = np.unique(dest_a * width + shard_a, return_index=True)
        keep = np.zeros(len(dest_a), dtype=bool)
        keep[first] = True
        n_layers = len(layer_names)
        rows = []
        for r, (lo, hi) in zip(ranks, pairwise(offsets), strict=True):
            kept = np.flatnonzero(keep[lo:hi])
            to = dest_a[lo:hi][kept]
            if len(kept):
                everything = len(kept) == hi - lo
                in_order = len(to) == n_layers and (to == np.arange(n_layers)).all()
                rows.append((r, None if everything else kept, None if in_order else to))
        d = dest_a[keep]
        expected = np.zeros(n_layers, dtype=np.int64)
        expected[d] = shards_a[keep]
        missing = np.bincount(d, minlength=n_layers) != expected
        site_dest = np.asarray([site_pos[s.name] for r in ranks for s in tables[r][1]], dtype=np.int64)
        n_sites = len(site_names)
        return cls(
            ranks=ranks,
            tables=tuple(tables[r] for r in ranks),
            layer_names=list(layer_names),
            site_names=list(site_names),
            rows=tuple(rows),
            dest=d,
            nan_if_missing=np.where(missing, np.nan, 1.0),
            site_dest=site_dest,
            moment_dest=np.concatenate((d, n_layers + site_dest, n_layers + n_sites + site_dest)),
        )

    def fits(self, tables: Tables, layer_names: list[str], site_names: list[str]) -> bool:
        """Was it made from these very tables and these names?"""
        return (
            all(tables.get(r) is held for r, held in zip(self.ranks, self.tables, strict=True))
            and layer_names == self.layer_names
            and site_names == self.site_names
        )


class MergePlans:
    """A job's merge plans by the set of ranks of a step, rebuilt when a table or name changed."""

    def __init__(self) -> None:
        self._plans: dict[tuple[int, ...], MergePlan] = {}

    def get(
        self, ranks: tuple[int, ...], tables: Tables, layer_names: list[str], site_names: list[str]
    ) -> MergePlan:
        plan = self._plans.get(ranks)
        if plan is None or not plan.fits(tables, layer_names, site_names):
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()  # rank sets that come and go (ranks lost, steps forced out)
            plan = self._plans[ranks] = MergePlan.build(ranks, tables, layer_names, site_names)
        return plan


def merge_step(
    step: int,
    parts: dict[int, Sample],
    tables: Tables,
    layer_names: list[str],
    site_names: list[str],
    plans: MergePlans | None = None,
) -> Sample:
    """One job-wide sample from the ranks' samples of one step (see module docstring).

    `plans`: the job's plans, reused while its tables stay the same; without, one is made
    for this step. Either way the result is, bit for bit, that of merging the concatenated
    columns of every rank, masked to the kept rows (bincount for the float sums, in rank
    order; np.add.at for the histograms).
    """
    ranks = tuple(sorted(parts))
    plan = (
        plans.get(ranks, tables, layer_names, site_names)
        if plans is not None
        else MergePlan.build(ranks, tables, layer_names, site_names)
    )
    n_layers, d = len(layer_names), plan.dest

    def kept(field: str) -> list[np.ndarray]:
        return [
            getattr(parts[r].layers, field) if rows is None else getattr(parts[r].layers, field)[rows]
            for r, rows, _ in plan.rows
        ]

    def column(field: str) -> np.ndarray:
        cols = kept(field)
        return cols[0] if len(cols) == 1 else np.concatenate(cols)

    # Sites: every rank's batch is a disjoint part of the job's batch. Their moments merge with
    # the layers' in one call: each group takes the same parts in the same order as merging
    # them apart would, so the sums are the same, in one round of numpy calls instead of three.
    # (Without a site row, apart: numpy's bincount of nothing is of integers.)
    sites = [parts[r].sites for r in ranks]
    n_sites = len(site_names)
    if len(plan.site_dest):
        counts = [s.count for s in sites]
        total, merged_mean, merged_m2 = physics.merge_moments_grouped(
            plan.moment_dest,
            np.concatenate((*kept("count"), *counts, *counts)),
            np.concatenate((*kept("mean"), *(s.in_mean for s in sites), *(s.out_mean for s in sites))),
            np.concatenate((*kept("m2"), *(s.in_m2 for s in sites), *(s.out_m2 for s in sites))),
            n_layers + 2 * n_sites,
        )
        n, mean, m2 = total[:n_layers], merged_mean[:n_layers], merged_m2[:n_layers]
        cut, out = slice(n_layers, n_layers + n_sites), slice(n_layers + n_sites, None)
        sn, in_mean, in_m2 = total[cut], merged_mean[cut], merged_m2[cut]
        out_mean, out_m2 = merged_mean[out], merged_m2[out]
    else:
        n, mean, m2 = physics.merge_moments_grouped(
            d, column("count"), column("mean"), column("m2"), n_layers
        )
        none = np.zeros(0, dtype=np.int64)
        sn, in_mean, in_m2 = physics.merge_moments_grouped(none, none, none, none, n_sites)
        _, out_mean, out_m2 = physics.merge_moments_grouped(none, none, none, none, n_sites)
    nan_if_missing = plan.nan_if_missing
    merged_hist = None  # ranks sample in step, so they take their histograms on the same steps
    if all(parts[r].layers.histogram is not None for r in ranks):
        # Integer sums, so any order gives what np.add.at over all kept rows gives; a rank
        # holds a layer once, so its rows scatter to distinct layers.
        for i, (r, rows, to) in enumerate(plan.rows):
            hist = parts[r].layers.histogram
            hist = hist if rows is None else hist[rows]
            if i == 0:
                merged_hist = np.zeros((n_layers, hist.shape[1]), dtype=np.int64)
            if to is None:
                merged_hist += hist
            else:
                merged_hist[to] += hist
    layers = LayerStats(
        count=n.astype(np.int64),
        mean=mean * nan_if_missing,
        m2=m2 * nan_if_missing,
        dot_before=np.bincount(d, column("dot_before"), n_layers) * nan_if_missing,
        dot_after=np.bincount(d, column("dot_after"), n_layers) * nan_if_missing,
        histogram=merged_hist,
    )

    probe = np.full(n_sites, -1.0)  # any rank whose probe moved makes the site temperature-dependent
    np.maximum.at(probe, plan.site_dest, np.concatenate([s.probe_spread for s in sites]))

    energies = [parts[r].energy for r in ranks if parts[r].has_energy]
    return Sample(
        step=step,
        wall_time=max(parts[r].wall_time for r in ranks),
        energy=_mean(energies),
        layers=layers,
        sites=SiteStats(sn.astype(np.int64), in_mean, in_m2, out_mean, out_m2, probe),
    )


def _mean(values: list[float]) -> float:
    """np.mean's value (the same pairwise sum, divided by the count), without its overhead; NaN if empty."""
    return float(np.add.reduce(np.array(values, dtype=np.float64))) / len(values) if values else math.nan
