"""A node aggregator's stream on the wire (docs/ray.md, "A node frame on the wire").

It is an ordinary `Telemetry/Stream` whose hello names the ranks it speaks for (`Hello.ranks`)
and a node table, whose entries may each hold a run of shards (`Shard.span`); each frame carries
the node's merged sample, how many ranks its energy averages (`Frame.energy_ranks`) and which of
the hello's ranks it merges (`Frame.ranks`). Built on the rank codec (`codec`); decoding validates
what a node's stream could break and raises `WireError`.
"""

from __future__ import annotations

from thermoscope.science.stats import LayerInfo, Sample, Table
from thermoscope.v1 import telemetry_pb2 as pb

from . import codec
from .codec import WireError


def node_hello(
    *,
    job_id: str,
    run_id: str,
    ranks: list[int],
    world_size: int,
    host: str,
    agent_version: str,
    node: str,
    every: int,
    table: Table,
    bins: int,
) -> pb.AgentMessage:
    """A node aggregator's hello: its ranks, and its node table (runs as `Shard.span`)."""
    msg = codec.hello(
        job_id=job_id,
        run_id=run_id,
        rank=min(ranks),
        world_size=world_size,
        host=host,
        agent_version=agent_version,
        node=node,
        every=every,
        layers=list(table.layers),
        sites=list(table.sites),
        bins=bins,
    )
    msg.hello.ranks.extend(sorted(ranks))
    for entry, layer, span in zip(msg.hello.layers, table.layers, table.spans, strict=True):
        if layer.shard_count > 1:
            entry.shard.CopyFrom(pb.Shard(index=layer.shard_index, count=layer.shard_count, span=span))
    return msg


def decode_node_hello(msg: pb.Hello) -> tuple[tuple[int, ...], Table]:
    """Validate a node aggregator's hello: its ranks (the lowest is `rank`, all in the world, each
    once) and its table (runs inside their layer, no two overlapping). WireError otherwise."""
    ranks = tuple(msg.ranks)
    if not ranks or list(ranks) != sorted(set(ranks)) or ranks[0] != msg.rank or ranks[-1] >= msg.world_size:
        raise WireError(
            "hello", f"node ranks {list(ranks)[:8]} must be increasing from rank {msg.rank}, in the world"
        )
    spans = tuple(max(layer.shard.span, 1) for layer in msg.layers)
    named = pb.Hello()
    named.CopyFrom(msg)
    del named.ranks[:]
    for i, layer in enumerate(named.layers):  # decode_hello sees one entry per name
        layer.name = f"{i}:{layer.name}"
        if layer.HasField("shard"):
            layer.shard.span = 0
    layers, sites = codec.decode_hello(named)
    layers = [
        LayerInfo(
            src.name,
            lay.shape,
            lay.numel,
            lay.dtype,
            lay.shard_index,
            lay.shard_count,
            lay.hist_lo,
            lay.hist_hi,
        )
        for src, lay in zip(msg.layers, layers, strict=True)
    ]
    covered: dict[str, set[int]] = {}
    for layer, span in zip(layers, spans, strict=True):
        shards = set(range(layer.shard_index, layer.shard_index + span))
        if layer.shard_index + span > layer.shard_count or shards & covered.get(layer.name, set()):
            raise WireError(
                "hello", f"layer {layer.name!r}: shards {sorted(shards)[:4]}... overlap or exceed the layer"
            )
        covered.setdefault(layer.name, set()).update(shards)
    return ranks, Table(tuple(layers), spans, tuple(sites))


def encode_node(sample: Sample, seq: int, energy_ranks: int, ranks: list[int]) -> pb.AgentMessage:
    """A node frame: the node's merged sample, how many ranks its energy averages, and its ranks."""
    msg = codec.encode(sample, seq)
    msg.frame.energy_ranks = energy_ranks
    msg.frame.ranks.extend(ranks)
    return msg


def decode_node(
    frame: pb.Frame,
    hello_ranks: tuple[int, ...],
    table: Table,
    bins: int,
    nonfinite: dict[str, int] | None = None,
) -> tuple[Sample, int, tuple[int, ...]]:
    """Validate a node frame against its hello: its sample (`codec.decode`, counting unusable
    values into `nonfinite`), how many ranks its energy averages, and which of the hello's ranks
    it merges. WireError otherwise."""
    ranks = tuple(frame.ranks)
    if not ranks or not set(ranks) <= set(hello_ranks) or len(set(ranks)) != len(ranks):
        raise WireError("invalid_value", f"frame {frame.seq}: ranks {list(ranks)[:8]} are not the hello's")
    if frame.energy_ranks > len(ranks):
        raise WireError(
            "invalid_value", f"frame {frame.seq}: energy of {frame.energy_ranks} ranks, {len(ranks)} merged"
        )
    sample = codec.decode(frame, len(table.layers), len(table.sites), bins, nonfinite)
    weight = frame.energy_ranks if sample.has_energy else 0
    if sample.has_energy and not weight:
        raise WireError("invalid_value", f"frame {frame.seq}: an energy that averages no rank")
    return sample, weight, ranks
