"""The layer table: each parameter tensor's `LayerInfo`, sharded (a DTensor, as FSDP2's
`fully_shard` makes them) or not, with histogram edges fixed from its initial statistics.

A sharded layer's edges come from the full tensor's moments, so that every shard declares the
same edges: describing sharded parameters is then a collective, which every rank of their device
mesh must make (`full_moments`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

from thermoscope.science import physics
from thermoscope.science.stats import LayerInfo

from .tensors import wide


def describe(name: str, p: torch.Tensor) -> LayerInfo:
    """A layer's table entry, with histogram edges fixed from its initial statistics."""
    with torch.no_grad():
        values = wide(p.detach())
        std, mean = (
            torch.std_mean(values, correction=0) if p.numel() > 1 else (torch.zeros(()), values.mean())
        )
    lo, hi = physics.histogram_edges(float(mean), float(std))
    dtype = str(p.dtype).removeprefix("torch.")
    return LayerInfo(name=name, shape=tuple(p.shape), numel=p.numel(), dtype=dtype, hist_lo=lo, hist_hi=hi)


def dtensor_type() -> type | None:
    """torch's DTensor class if torch.distributed.tensor is loaded, else None: a parameter can
    only be a DTensor once it is, and importing it here would add ~0.5 s to every start."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def shard_position(
    placements: Sequence, coordinate: Sequence[int], mesh_shape: Sequence[int]
) -> tuple[int, int]:
    """(shard index, shard count) of a DTensor's local shard.

    The index numbers this rank's coordinates along the mesh dimensions that shard the tensor
    (row-major); the count is the product of their sizes. Replicated dimensions do not count:
    their ranks hold copies of the same shard (HSDP), which the collector takes once.
    """
    index, count = 0, 1
    for placement, coord, size in zip(placements, coordinate, mesh_shape, strict=True):
        if placement.is_shard():
            index, count = index * size + coord, count * size
    return index, count


def full_moments(params: list[torch.Tensor], shards: list[torch.Tensor]) -> list[tuple[float, float]]:
    """(mean, std) of each DTensor's full value, from the local shards of every rank.

    A collective: all ranks must call it with the same parameters in the same order (each
    constructs its Monitor over the same model). Per group of parameters sharded over the same
    mesh dimensions, two all_reduce calls over those dimensions: the counts and sums give the
    mean, then the squared deviations from it give the variance. Two passes, as for a whole
    tensor, so that a constant tensor has a variance of exactly 0 (one pass of sums of squares
    would leave round-off, and edges sized by it).
    """
    groups: dict[tuple, list[int]] = {}
    for k, p in enumerate(params):
        sharded = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
        groups.setdefault((p.device_mesh, sharded), []).append(k)

    def all_reduce(mesh, dims: tuple[int, ...], values: torch.Tensor) -> torch.Tensor:
        for d in dims:
            torch.distributed.all_reduce(values, group=mesh.get_group(d))
        return values

    moments = [(0.0, 0.0)] * len(params)
    for (mesh, dims), members in groups.items():
        local = [shards[k].detach().reshape(-1) for k in members]  # in float64 one at a time
        count = torch.tensor([v.numel() for v in local], dtype=torch.float64, device=local[0].device)
        sums = torch.stack([v.sum(dtype=torch.float64) for v in local])
        count, sums = all_reduce(mesh, dims, torch.stack([count, sums]))
        mean = sums / count
        deviations = [(v.double() - m).square().sum() for v, m in zip(local, mean, strict=True)]
        m2 = all_reduce(mesh, dims, torch.stack(deviations))
        for k, m, var in zip(members, mean.tolist(), (m2 / count).tolist(), strict=True):
            moments[k] = (m, math.sqrt(var))
    return moments


def describe_shard(name: str, p: torch.Tensor, local: torch.Tensor, mean: float, std: float) -> LayerInfo:
    """A sharded layer's table entry: the full shape, the values this rank holds (maybe none),
    its shard's place, and histogram edges from the full tensor's moments, so that every shard
    declares the same edges (the collector refuses a layer whose ranks disagree)."""
    index, count = shard_position(p.placements, p.device_mesh.get_coordinate(), p.device_mesh.shape)
    lo, hi = physics.histogram_edges(mean, std)
    dtype = str(p.dtype).removeprefix("torch.")
    return LayerInfo(name, tuple(p.shape), local.numel(), dtype, index, count, lo, hi)
