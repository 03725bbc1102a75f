"""The merge of one step: its parts (a job's ranks, a node's ranks, or a job's nodes) -> one
sample. One engine for all three (docs/ray.md, "One job of thousands of ranks").

Each part reports a `Table` (science/stats.py): a rank's entries are one shard each, a node
aggregator's are runs of shards (`Table.of_node`). A merge fills the rows of a `Target`: the job's
layers, whole (`Target.whole`), or a node's runs (`Target.runs`). Each entry goes to the row of its
layer that holds its shards. Parts are taken lowest first, and an entry holding a shard that a kept
entry holds already (a replica's copy) is skipped: a layer held whole by several ranks (data
parallel replicas) is counted once, from the lowest rank, and a layer split into shards (FSDP,
ZeRO: `Shard{index, count}`) is the exact Chan merge of one copy of each shard, its work dots,
update sums of squares and histograms added. A row whose kept entries do not hold all its shards at
a step is NaN for that step (a job's layer that no part of the step holds reads empty, count 0: no
shard of it was due). Activation sites pool every part's batch. Energy is the mean over ranks: a
node's weighs as many ranks as its energy averages.

A flat job is the case of one-shard entries; through node aggregators a job merges to what its
ranks streaming flat merge to, to rounding (tests/test_aggregate.py), because every statistic
stays a mergeable sufficient statistic and each merge keeps what tells the next how to weigh
it. The replica copy read is the same when each node holds consecutive ranks (Ray Train,
torchrun and Slurm number ranks node by node); replicas hold equal values anyway. Which steps
merge when is the job's pipeline's (pipeline.py), and the aggregator's (node/aggregator.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from thermoscope.science import physics
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats, Table

#: Plans a merger keeps (one per set of parts that sent a step; usually one): more are dropped.
MAX_PLANS = 8

#: A job's bound tables by rank (a node's: by its lowest rank), as its pipeline holds them.
Tables = dict[int, tuple[list[LayerInfo], list[SiteInfo]]]
#: A node stream's ranks and its table's spans, by its lowest rank.
Nodes = Mapping[int, tuple[tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class Target:
    """The rows a merge fills. Layer row i holds shards `firsts[i] .. firsts[i] + spans[i] - 1`
    of layer `names[i]` (a node's run) or, where `spans[i]` is None, the whole layer: as many
    shards as the entries it keeps say the layer has (the last of them, should ranks disagree).
    Then the sites, by name."""

    names: tuple[str, ...]
    firsts: tuple[int, ...]
    spans: tuple[int | None, ...]
    sites: tuple[str, ...]

    @classmethod
    def whole(cls, layer_names: Iterable[str], site_names: Iterable[str]) -> Target:
        """A job's layers, one row each."""
        names = tuple(layer_names)
        return cls(names, (0,) * len(names), (None,) * len(names), tuple(site_names))

    @classmethod
    def runs(cls, table: Table) -> Target:
        """A node's rows: the runs of its table."""
        return cls(
            tuple(layer.name for layer in table.layers),
            tuple(layer.shard_index for layer in table.layers),
            table.spans,
            tuple(site.name for site in table.sites),
        )


@dataclass(frozen=True, eq=False)
class Plan:
    """What merging a step of one set of parts takes from their tables alone, worked out once.

    The tables change only when a part says hello, while a job merges a step every second or
    more often: the destinations, the replica de-duplication and the expected shard coverage
    would otherwise be recomputed at every step, over Python lists of every layer. `apply` is
    then a fixed round of numpy calls; `Merger` keeps a target's plans.
    """

    keys: tuple[int, ...]
    tables: tuple[Table, ...]  # the parts' tables: compared by identity
    n_layers: int
    n_sites: int
    #: per part that contributes: (key, its kept rows or None: all, their target rows or None:
    #: its rows are the target's in order)
    rows: tuple[tuple[int, np.ndarray | None, np.ndarray | None], ...]
    dest: np.ndarray  # the kept rows' target rows, in the order of `rows`
    repeats: bool  # a part's kept rows go to one target row twice (a node's runs of one layer)
    nan_if_missing: np.ndarray  # NaN where a row misses a shard, else 1
    nan_if_unheld: np.ndarray  # ... and where no entry holds the row (nothing said, not 0)
    site_dest: np.ndarray  # every part's site rows' target sites, in part order
    #: where each moment `apply` merges goes, in one group array: the kept layer rows to their
    #: rows, then every part's sites' inputs and outputs to theirs (offset past the layers)
    moment_dest: np.ndarray

    @classmethod
    def build(cls, keys: tuple[int, ...], tables: Mapping[int, Table], target: Target) -> Plan:
        """The plan for a step sent by the parts `keys` (sorted), from scratch."""
        parts = [tables[k] for k in keys]
        n_layers, n_sites = len(target.names), len(target.sites)
        name_row: dict[str, int] = {}  # each layer's first row
        for row, name in enumerate(target.names):
            name_row.setdefault(name, row)
        layers = [layer for t in parts for layer in t.layers]
        named = np.array([name_row[layer.name] for layer in layers], dtype=np.int64)
        first = np.array([layer.shard_index for layer in layers], dtype=np.int64)
        count = np.array([layer.shard_count for layer in layers], dtype=np.int64)
        span = np.array([s for t in parts for s in t.spans], dtype=np.int64)
        # An entry's row: of the rows of its layer, the last whose first shard is at or below its own.
        width = int(max(first.max(), max(target.firsts))) + 1
        starts = np.array([name_row[n] for n in target.names], dtype=np.int64) * width + target.firsts
        by_start = np.argsort(starts, kind="stable")
        row = by_start[np.searchsorted(starts[by_start], named * width + first, side="right") - 1]

        # Keep, lowest part first, each entry none of whose shards a kept entry holds. A copy of
        # an entry (same row, shards) is never kept after it, and distinct one-shard entries do
        # not overlap: only the rows that take runs of shards need the walk.
        by = np.lexsort((span, first, row))
        new = np.ones(len(row), dtype=bool)
        new[1:] = (np.diff(row[by]) != 0) | (np.diff(first[by]) != 0) | (np.diff(span[by]) != 0)
        keep = np.zeros(len(row), dtype=bool)
        keep[by[new]] = True
        held: dict[int, set[int]] = {}
        for i in np.flatnonzero(keep & np.isin(row, row[span > 1])).tolist():
            shards = range(int(first[i]), int(first[i] + span[i]))
            taken = held.setdefault(int(row[i]), set())
            if taken.isdisjoint(shards):
                taken.update(shards)
            else:
                keep[i] = False

        rows = []
        offsets = np.cumsum([0, *(len(t.layers) for t in parts)])
        for key, (lo, hi) in zip(keys, pairwise(offsets.tolist()), strict=True):
            kept = np.flatnonzero(keep[lo:hi])
            to = row[lo:hi][kept]
            if len(kept):
                everything = len(kept) == hi - lo
                in_order = len(to) == n_layers and (to == np.arange(n_layers)).all()
                rows.append((key, None if everything else kept, None if in_order else to))
        d = row[keep]
        # A run needs its span; a whole layer the shard count its last kept entry declares (none
        # kept: none due).
        expected = np.array([0 if s is None else s for s in target.spans], dtype=np.int64)
        last = np.full(n_layers, -1)
        np.maximum.at(last, d, np.arange(len(d)))
        whole = np.array([s is None for s in target.spans], dtype=bool) & (last >= 0)
        expected[whole] = count[keep][last[whole]]
        missing = np.bincount(d, span[keep], n_layers) != expected
        site_pos = {name: j for j, name in enumerate(target.sites)}
        site_dest = np.asarray([site_pos[s.name] for t in parts for s in t.sites], dtype=np.int64)
        return cls(
            keys=keys,
            tables=tuple(parts),
            n_layers=n_layers,
            n_sites=n_sites,
            rows=tuple(rows),
            dest=d,
            repeats=any(to is not None and len(np.unique(to)) < len(to) for _, _, to in rows),
            nan_if_missing=np.where(missing, np.nan, 1.0),
            nan_if_unheld=np.where(missing | (np.bincount(d, minlength=n_layers) == 0), np.nan, 1.0),
            site_dest=site_dest,
            moment_dest=np.concatenate((d, n_layers + site_dest, n_layers + n_sites + site_dest)),
        )

    def made_of(self, tables: Mapping[int, Table]) -> bool:
        """Was it made from these very tables?"""
        return all(tables[k] is held for k, held in zip(self.keys, self.tables, strict=True))

    def apply(self, step: int, parts: Mapping[int, Sample], weights: Mapping[int, int]) -> tuple[Sample, int]:
        """The merged sample of `parts` (by key, those of `keys`), and how many ranks its energy
        averages; `weights`: how many ranks a part's energy averages (a key absent: 1, a rank).

        The result is, bit for bit, that of merging the concatenated columns of every part,
        masked to the kept rows (bincount for the float sums, in part order; np.add.at for the
        histograms)."""
        keys, n_layers, n_sites, d = self.keys, self.n_layers, self.n_sites, self.dest

        def kept(field: str) -> list[np.ndarray]:
            return [
                getattr(parts[k].layers, field) if rows is None else getattr(parts[k].layers, field)[rows]
                for k, rows, _ in self.rows
            ]

        def column(field: str) -> np.ndarray:
            cols = kept(field)
            return cols[0] if len(cols) == 1 else np.concatenate(cols)

        # Sites: every part's batch is a disjoint part of the job's batch. Their moments merge
        # with the layers' in one call: each group takes the same parts in the same order as
        # merging them apart would, so the sums are the same, in one round of numpy calls
        # instead of three. (Without a site row, apart: numpy's bincount of nothing is of integers.)
        sites = [parts[k].sites for k in keys]
        if len(self.site_dest):
            counts = [s.count for s in sites]
            total, merged_mean, merged_m2 = physics.merge_moments_grouped(
                self.moment_dest,
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
        nan_if_missing = self.nan_if_missing
        merged_hist = None  # ranks sample in step, so they take their histograms on the same steps
        if all(parts[k].layers.histogram is not None for k in keys):
            # Integer sums, so any order gives what np.add.at over all kept rows gives: unless the
            # plan `repeats`, a part's rows go to distinct rows and each part adds at once (an
            # indexed += adds a repeated row once).
            bins = parts[keys[0]].layers.histogram.shape[1]
            merged_hist = np.zeros((n_layers, bins), dtype=np.int64)
            if self.repeats:
                np.add.at(merged_hist, d, column("histogram"))
            else:
                for k, rows, to in self.rows:
                    hist = parts[k].layers.histogram
                    hist = hist if rows is None else hist[rows]
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
            # a sum over the layer's values, as the dots: its shards' add, one replica's kept; a
            # layer no part held at the step said no update (NaN), not one of 0
            update_sq=np.bincount(d, column("update_sq"), n_layers) * self.nan_if_unheld,
        )

        probe = np.full(n_sites, -1.0)  # any part whose probe moved makes the site temperature-dependent
        np.maximum.at(probe, self.site_dest, np.concatenate([s.probe_spread for s in sites]))

        # The mean over ranks: np.mean's value (the same pairwise sum, divided by the count)
        # without its overhead; a node weighs as many ranks as its energy averages.
        with_energy = [k for k in keys if parts[k].has_energy]
        energies = np.array([parts[k].energy for k in with_energy], dtype=np.float64)
        averaged = len(with_energy)
        if weights:
            ranks = [weights.get(k, 1) for k in with_energy]
            energies, averaged = energies * ranks, sum(ranks)
        merged = Sample(
            step=step,
            wall_time=max(parts[k].wall_time for k in keys),
            energy=float(np.add.reduce(energies)) / averaged if averaged else math.nan,
            layers=layers,
            sites=SiteStats(sn.astype(np.int64), in_mean, in_m2, out_mean, out_m2, probe),
        )
        return merged, averaged


class Merger:
    """Parts -> one `target`: each set of parts by its plan, kept while their tables stay."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._plans: dict[tuple[int, ...], Plan] = {}

    def merge(
        self,
        step: int,
        parts: Mapping[int, Sample],
        tables: Mapping[int, Table],
        weights: Mapping[int, int] | None = None,
    ) -> tuple[Sample, int]:
        """The merged sample of `parts` (by key: a rank, or a node's lowest rank), given each
        part's table, and how many ranks its energy averages; `weights`: per part, how many
        ranks its energy averages (a key absent: 1, a rank)."""
        keys = tuple(sorted(parts))
        plan = self._plans.get(keys)
        if plan is None or not plan.made_of(tables):
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()  # sets of parts that come and go (ranks lost, steps forced out)
            plan = self._plans[keys] = Plan.build(keys, tables, self.target)
        return plan.apply(step, parts, weights or {})


class JobMerge:
    """A job's merge (`pipeline.Pipeline`): its parts, ranks and nodes alike, each with the
    tables it bound, into the job's layers, whole, and its sites, in the order they were bound
    (the order of the job's thermometer). A rank's table is the node case of one shard an entry."""

    def __init__(self) -> None:
        self._merger: Merger | None = None
        self._names: tuple[list[str], list[str]] = ([], [])  # its target's (lists: the cheapest compared)
        self._tables: dict[int, Table] = {}  # each part's bound entry as a Table
        self._made_of: dict[int, object] = {}  # ... and the entry it was made of

    def merge(
        self,
        step: int,
        parts: Mapping[int, Sample],
        bound: Tables,
        layer_names: Iterable[str],
        site_names: Iterable[str],
        nodes: Nodes | None = None,
        weights: Mapping[int, int] | None = None,
    ) -> Sample:
        """The job-wide sample of `parts` (by rank, or by a node's lowest rank), given each
        part's bound tables `bound`, the job's layer and site names, the node streams' ranks and
        spans (`nodes`; a key absent: a rank's) and, per node, how many ranks its energy
        averages (`weights`; a rank: 1)."""
        names = (list(layer_names), list(site_names))
        if self._merger is None or names != self._names:
            self._merger, self._names = Merger(Target.whole(*names)), names
        tables, made_of = self._tables, self._made_of
        for key in parts:
            entry = bound[key]
            if made_of.get(key) is not entry:  # bound anew: the part's Table, made once
                layers, sites = entry
                spans = nodes[key][1] if nodes and key in nodes else (1,) * len(layers)
                tables[key], made_of[key] = Table(tuple(layers), spans, tuple(sites)), entry
        return self._merger.merge(step, parts, tables, weights)[0]
