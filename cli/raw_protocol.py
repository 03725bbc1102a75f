"""The messages of agents written against the wire contract without the `Monitor`: hellos,
plausible samples and their frames, a frame's stamp alone, and what a node aggregator sends.

The load generator's agents send them (`loadgen.py`, `loadgen_nodes.py`), and so do the tests'
raw-protocol clients (tests/helpers/protocol.py, nodes.py), so that both speak the same
messages. Every sample has the same statistics: what the collector does with them is measured
or checked, not what they say.
"""

from __future__ import annotations

import time

import numpy as np

from thermoscope.collector.merge import Merger, Target
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats, Table
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec
from thermoscope.wire.node import encode_node, node_hello

BINS = 8  # histogram bins the raw agents declare


def layer_table(n: int, shard: tuple[int, int] = (0, 1), numel: int = 100) -> list[LayerInfo]:
    """`n` layers named layer0, layer1, ..., each `numel` values, all the same shard of their tensor."""
    return [LayerInfo(f"layer{i}", (numel,), numel, "float32", *shard) for i in range(n)]


def site_table(n: int) -> list[SiteInfo]:
    """`n` ReLU sites named site0, site1, ..."""
    return [SiteInfo(f"site{i}", "ReLU") for i in range(n)]


def histogram(n_layers: int, per_bin: int = 10) -> np.ndarray:
    """A flat histogram: `per_bin` values in every bin, none outside the edges."""
    hist = np.full((n_layers, BINS + 2), per_bin, dtype=np.int64)
    hist[:, [0, -1]] = 0
    return hist


def site_stats(count: np.ndarray, *moments: np.ndarray) -> SiteStats:
    """Site columns with the probe marked as not run (-1)."""
    return SiteStats(count, *moments, probe_spread=np.full(len(count), -1.0))


def hello(
    job: str,
    n_layers: int = 2,
    n_sites: int = 1,
    *,
    run: str,
    agent: str,
    rank: int = 0,
    world_size: int = 1,
    layers: list[LayerInfo] | None = None,
) -> pb.AgentMessage:
    """A rank's hello: `n_layers` layers (or `layers`), `n_sites` ReLU sites, BINS bins, every
    step sampled; `agent` names its host and its version."""
    return codec.hello(
        job_id=job,
        run_id=run,
        rank=rank,
        world_size=world_size,
        host=agent,
        agent_version=agent,
        every=1,
        layers=layers or layer_table(n_layers),
        sites=site_table(n_sites),
        bins=BINS,
    )


def sample(
    step: int,
    n_layers: int = 2,
    n_sites: int = 1,
    energy: float = 1.0,
    numel: int = 100,
    wall_time: float | None = None,
) -> Sample:
    """A plausible sample for `hello`'s tables: the same statistics at every step, stamped
    `wall_time` (None: now)."""
    ones = np.ones(n_layers)
    return Sample(
        step=step,
        wall_time=time.time() if wall_time is None else wall_time,
        energy=energy,
        layers=LayerStats(
            np.full(n_layers, numel, dtype=np.int64),
            0.1 * ones,
            2.0 * ones,
            0.5 * ones,
            0.4 * ones,
            histogram(n_layers),
        ),
        sites=site_stats(np.full(n_sites, 64, dtype=np.int64), *(np.ones(n_sites) for _ in range(4))),
    )


def frame(seq: int, step: int, n_layers: int = 2, n_sites: int = 1, **kw) -> pb.AgentMessage:
    """`sample(step, ...)` encoded as frame `seq`."""
    return codec.encode(sample(step, n_layers, n_sites, **kw), seq)


def stamp(seq: int, step: int, wall_time: float) -> bytes:
    """A frame's seq, step and wall time alone, serialized: appended to a serialized frame they
    replace its own (protobuf merges concatenated encodings, the later scalars win), so one
    frame encoded once is sent as many."""
    return pb.AgentMessage(frame=pb.Frame(seq=seq, step=step, wall_time=wall_time)).SerializeToString()


class Node:
    """What a node aggregator sends for the ranks of `tables` (each rank's `Table`): its hello,
    and one merged frame per step of their samples (the exact merge, `collector/merge.py`, as
    `collector/node/aggregator.py` makes it)."""

    def __init__(
        self, job: str, tables: dict[int, Table], world_size: int, *, name: str, run: str, agent: str
    ) -> None:
        self.ranks = sorted(tables)
        self.tables = tables
        self.table = Table.of_node(tables)
        self.merger = Merger(Target.runs(self.table))
        self.hello = node_hello(
            job_id=job,
            run_id=run,
            ranks=self.ranks,
            world_size=world_size,
            host=agent,
            agent_version=agent,
            node=name,
            every=1,
            table=self.table,
            bins=BINS,
        )

    def frame(self, seq: int, step: int, parts: dict[int, Sample]) -> pb.AgentMessage:
        """Frame `seq`: the merge at `step` of the node's ranks among `parts` (rank -> sample)."""
        mine = {r: parts[r] for r in self.ranks if r in parts}
        merged, energy_ranks = self.merger.merge(step, mine, self.tables)
        return encode_node(merged, seq, energy_ranks, sorted(mine))
