"""The exact node-level merge of one large job: a node's ranks -> one node frame per step, and
the job's nodes -> one job-wide sample (docs/ray.md, "One job of thousands of ranks"). The node
frame's wire form is proto/wire/node.py; a node's table, `Table.of_node` (science/stats.py).

A node aggregator pre-merges the frames of the ranks on its node, so the job's collector merges
one frame per node per step instead of one per rank. The result is the flat merge's
(`merge.merge_step` over every rank), to rounding, because every statistic stays a mergeable
sufficient statistic and each merge keeps what tells the next one how to weigh it:

- layers: a node table holds each (layer, shard) once, from the node's lowest rank holding it
  (a replica: its lowest rank's values), and Chan-merges the shards it holds into *runs*: each
  run covers shards `start .. start + span - 1` (`Shard.span` on the wire). A layer whose every
  shard is on the node is one run. The job's merge takes the nodes lowest first and skips a run
  any of whose shards a lower node's runs cover (a replica's copy), and Chan-merges the runs of
  a layer; a layer whose runs do not cover its shards at a step is NaN there, as the flat
  merge's missing shard is. Work dots add, histograms add.
- sites: each site once per node, pooling its ranks' batches (Chan), pooled again over nodes.
- energy: the mean over ranks. A node frame carries its ranks' mean and how many ranks it
  averages (`Frame.energy_ranks`); the job weighs nodes by it.

Equal to the flat merge's choice of replicas when each node holds consecutive ranks (Ray Train,
torchrun and Slurm number ranks node by node); replicas hold equal values anyway, so otherwise
only which copy is read differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from thermoscope.science import physics
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats, Table
from thermoscope.wire.codec import WireError

#: Plans kept per merger (one per set of parts that sent a step; usually one).
MAX_PLANS = 8


def _keys(table: Table) -> list[tuple[str, int, int]]:
    """(name, first shard, span) of each entry."""
    return [(lay.name, lay.shard_index, s) for lay, s in zip(table.layers, table.spans, strict=True)]


def job_table(tables: dict[int, Table]) -> tuple[list[LayerInfo], list[SiteInfo]]:
    """The job's layers (one whole entry per name) and sites that `tables`' parts merge into."""
    layers: dict[str, LayerInfo] = {}
    sites: dict[str, SiteInfo] = {}
    for key in sorted(tables):
        for layer in tables[key].layers:
            if layer.name not in layers:
                layers[layer.name] = LayerInfo(
                    layer.name,
                    layer.shape,
                    math.prod(layer.shape),
                    layer.dtype,
                    0,
                    1,
                    layer.hist_lo,
                    layer.hist_hi,
                )
        for site in tables[key].sites:
            sites.setdefault(site.name, site)
    return list(layers.values()), list(sites.values())


@dataclass(frozen=True, eq=False)
class Plan:
    """How the parts of one set merge into an output table, worked out once from their tables.

    Each input entry goes to the output row whose shards contain its own, unless a lower part's
    entry covers any of its shards already (a replica's copy); an output row whose kept inputs
    do not cover all its shards is NaN (`nan_if_missing`)."""

    keys: tuple[int, ...]
    tables: tuple[Table, ...]  # compared by identity
    rows: tuple[np.ndarray, ...]  # per part: its kept rows
    dest: np.ndarray  # the kept rows' output rows, in part order
    nan_if_missing: np.ndarray
    site_dest: np.ndarray
    n_out: int
    n_sites: int

    @classmethod
    def build(
        cls, keys: tuple[int, ...], tables: dict[int, Table], out: Table, site_names: list[str]
    ) -> Plan:
        by_name: dict[str, list[tuple[int, int, int]]] = {}  # name -> (first shard, span, output row)
        for row, (name, first, span) in enumerate(_keys(out)):
            by_name.setdefault(name, []).append((first, span, row))
        covered = [np.zeros(span, dtype=bool) for span in out.spans]
        rows, dest = [], []
        for key in keys:
            kept = []
            for i, (name, first, span) in enumerate(_keys(tables[key])):
                for o_first, o_span, o_row in by_name[name]:
                    if o_first <= first and first + span <= o_first + o_span:
                        shards = covered[o_row][first - o_first : first - o_first + span]
                        if not shards.any():  # a copy of shards a lower part holds adds nothing
                            shards[:] = True
                            kept.append(i)
                            dest.append(o_row)
                        break
                else:
                    raise WireError(
                        "hello", f"layer {name!r}: shards {first}..{first + span - 1} fit no entry"
                    )
            rows.append(np.asarray(kept, dtype=np.int64))
        site_pos = {name: j for j, name in enumerate(site_names)}
        missing = np.array([not c.all() for c in covered], dtype=bool)
        return cls(
            keys=keys,
            tables=tuple(tables[k] for k in keys),
            rows=tuple(rows),
            dest=np.asarray(dest, dtype=np.int64),
            nan_if_missing=np.where(missing, np.nan, 1.0),
            site_dest=np.asarray([site_pos[s.name] for k in keys for s in tables[k].sites], dtype=np.int64),
            n_out=len(out.layers),
            n_sites=len(site_names),
        )

    def apply(self, step: int, parts: list[Sample], weights: list[int]) -> tuple[Sample, int]:
        """The merged sample of `parts` (in `keys` order), and how many ranks its energy averages;
        `weights[i]`: how many ranks part i's energy averages."""
        d, n_out = self.dest, self.n_out

        def kept(field: str) -> np.ndarray:
            return np.concatenate(
                [getattr(p.layers, field)[rows] for p, rows in zip(parts, self.rows, strict=True)]
            )

        n, mean, m2 = physics.merge_moments_grouped(d, kept("count"), kept("mean"), kept("m2"), n_out)
        nan = self.nan_if_missing
        hist = None  # ranks sample in step: they take their histograms on the same steps
        if all(p.layers.histogram is not None for p in parts):
            hist = np.zeros((n_out, parts[0].layers.histogram.shape[1]), dtype=np.int64)
            np.add.at(hist, d, kept("histogram"))
        layers = LayerStats(
            count=n.astype(np.int64),
            mean=mean * nan,
            m2=m2 * nan,
            dot_before=np.bincount(d, kept("dot_before"), n_out) * nan,
            dot_after=np.bincount(d, kept("dot_after"), n_out) * nan,
            histogram=hist,
        )
        sd, ns = self.site_dest, self.n_sites

        def pooled(field: str) -> np.ndarray:
            return np.concatenate([getattr(p.sites, field) for p in parts])

        count = pooled("count")
        sn, in_mean, in_m2 = physics.merge_moments_grouped(sd, count, pooled("in_mean"), pooled("in_m2"), ns)
        _, out_mean, out_m2 = physics.merge_moments_grouped(
            sd, count, pooled("out_mean"), pooled("out_m2"), ns
        )
        probe = np.full(ns, -1.0)
        np.maximum.at(probe, sd, pooled("probe_spread"))
        with_energy = [(p.energy, w) for p, w in zip(parts, weights, strict=True) if p.has_energy]
        ranks = sum(w for _, w in with_energy)
        energy = sum(e * w for e, w in with_energy) / ranks if ranks else math.nan
        merged = Sample(
            step=step,
            wall_time=max(p.wall_time for p in parts),
            energy=energy,
            layers=layers,
            sites=SiteStats(sn.astype(np.int64), in_mean, in_m2, out_mean, out_m2, probe),
        )
        return merged, ranks


class Merger:
    """Parts (ranks of a node, or nodes of a job) -> one output table, with a plan per set of parts."""

    def __init__(self, out: Table) -> None:
        self.out = out
        self._site_names = [s.name for s in out.sites]
        self._plans: dict[tuple[int, ...], Plan] = {}

    def merge(
        self,
        step: int,
        parts: dict[int, Sample],
        tables: dict[int, Table],
        weights: dict[int, int] | None = None,
    ) -> tuple[Sample, int]:
        """The merged sample of `parts` (by key: rank or node's lowest rank) and how many ranks
        its energy averages; `weights`: per part, how many ranks its energy averages (default 1)."""
        keys = tuple(sorted(parts))
        plan = self._plans.get(keys)
        if plan is None or any(tables[k] is not t for k, t in zip(keys, plan.tables, strict=True)):
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            plan = self._plans[keys] = Plan.build(keys, tables, self.out, self._site_names)
        w = [1 if weights is None else weights[k] for k in keys]
        return plan.apply(step, [parts[k] for k in keys], w)


class JobMerge:
    """A job's merge once node streams feed it (`pipeline.Pipeline`): its parts, ranks and nodes
    alike, each with its bound table, into the job's layers and sites in the order they were
    bound (the order the flat merge and the job's thermometer use)."""

    def __init__(self) -> None:
        self._merger: Merger | None = None
        self._names: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._tables: dict[int, tuple[object, Table]] = {}  # key -> (its bound entry, its Table)

    def merge(
        self,
        step: int,
        parts: dict[int, Sample],
        bound: dict[int, tuple[list[LayerInfo], list[SiteInfo]]],
        nodes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]],
        layers: dict[str, LayerInfo],
        sites: dict[str, SiteInfo],
        weights: dict[int, int],
    ) -> Sample:
        """The job-wide sample of `parts` (by rank, or by a node's lowest rank), given each part's
        bound tables `bound`, the nodes' (ranks, spans) (`nodes`; a key absent: a rank), the
        job's `layers` and `sites` by name and, per node, how many ranks its energy averages
        (`weights`; a rank: 1)."""
        names = (tuple(layers), tuple(sites))
        if self._merger is None or names != self._names:
            whole = [
                LayerInfo(la.name, la.shape, math.prod(la.shape), la.dtype, 0, 1, la.hist_lo, la.hist_hi)
                for la in layers.values()
            ]
            counts = tuple(la.shard_count for la in layers.values())
            self._merger, self._names = Merger(Table(tuple(whole), counts, tuple(sites.values()))), names
        tables = {}
        for key in parts:
            entry = bound[key]
            cached = self._tables.get(key)
            if cached is None or cached[0] is not entry:
                layer_list, site_list = entry
                span = nodes[key][1] if key in nodes else (1,) * len(layer_list)
                cached = self._tables[key] = (entry, Table(tuple(layer_list), span, tuple(site_list)))
            tables[key] = cached[1]
        merged, _ = self._merger.merge(step, parts, tables, {k: weights.get(k, 1) for k in parts})
        return merged


def job_merger(tables: dict[int, Table]) -> Merger:
    """The merger of a job's node (or rank) tables into its layers, one whole entry each."""
    layers, sites = job_table(tables)
    shards = {layer.name: layer.shard_count for t in tables.values() for layer in t.layers}
    return Merger(Table(tuple(layers), tuple(shards[layer.name] for layer in layers), tuple(sites)))
