"""The layer table: each parameter tensor's `LayerInfo`, sharded (a DTensor, as FSDP2's
`fully_shard` makes them; or a plain tensor holding this rank's slice of a tensor-parallel layer,
as Megatron-LM and DeepSpeed make them: `TensorParallel`) or not, with histogram edges fixed from
its initial statistics.

A sharded layer's edges come from the full tensor's moments, so that every shard declares the
same edges: describing sharded parameters is then a collective, which every rank of their device
mesh (or tensor-parallel group) must make (`full_moments`, `slice_moments`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from thermoscope.science import physics
from thermoscope.science.stats import LayerInfo

from .tensors import wide


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group, for parameters held as plain tensors that are
    slices of one layer (Megatron-LM's and DeepSpeed's tensor parallelism): the slices have the
    same name on every rank of the group, and without this the collector would take them for
    replicas of a whole layer (one of them kept). `rank` of `size`: this rank's slice, along
    the slice dimension, of every sliced parameter (equal slices, as both make them); `dims`: the
    sliced parameters by name and the dimension each is split along (None: those Megatron marks,
    `tensor_model_parallel` with its `partition_dim`, as Megatron-LM and Megatron-DeepSpeed
    set them); `group`: the process group of the `size` ranks, over which the sliced layers'
    histogram edges are sized (None: the default group, which every rank then joins; its other
    ranks, data-parallel replicas of the same slices, leave the moments as they are)."""

    rank: int
    size: int
    dims: Mapping[str, int] | None = None
    group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor_parallel: rank {self.rank} of {self.size} is not a place in a group")
        if self.dims is not None:
            object.__setattr__(self, "dims", dict(self.dims))

    def dim(self, name: str, p: torch.Tensor) -> int | None:
        """The dimension `p` (named `name`) is split along, or None if this rank holds it whole."""
        if self.dims is not None:
            return self.dims.get(name)
        return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None  # type: ignore[attr-defined]

    def check(self, layers: Sequence[tuple[str, torch.Tensor]]) -> None:
        """ValueError for a slice the layers cannot hold: a name no parameter has, or a dimension
        the tensor does not have (a typo would otherwise read slices as replicas, silently)."""
        if self.dims is None:
            return
        shapes = {name: p.shape for name, p in layers}
        for name, dim in self.dims.items():
            if name not in shapes:
                raise ValueError(
                    f"tensor_parallel: no parameter named {name!r} (the model's: {list(shapes)})"
                )
            if not -len(shapes[name]) <= dim < len(shapes[name]):
                raise ValueError(
                    f"tensor_parallel: {name!r} of shape {tuple(shapes[name])} has no dimension {dim}"
                )


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
        reduced = _moments([shards[k] for k in members], lambda v, m=mesh, d=dims: all_reduce(m, d, v))
        for k, pair in zip(members, reduced, strict=True):
            moments[k] = pair
    return moments


def slice_moments(slices: list[torch.Tensor], group: Any) -> list[tuple[float, float]]:
    """(mean, std) of each tensor-parallel layer's full value, from every rank's slice of it
    (`TensorParallel`). A collective over `group`, as `full_moments` is over a mesh."""
    if not slices:
        return []

    def all_reduce(values: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(values, group=group)
        return values

    return _moments(slices, all_reduce)


def _moments(
    parts: list[torch.Tensor], all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> list[tuple[float, float]]:
    """(mean, std) of each tensor whose parts the ranks hold, `all_reduce` summing over them: the
    counts and sums give the means, then the squared deviations from them the variances."""
    local = [v.detach().reshape(-1) for v in parts]  # in float64 one at a time
    count = torch.tensor([v.numel() for v in local], dtype=torch.float64, device=local[0].device)
    sums = torch.stack([v.sum(dtype=torch.float64) for v in local])
    count, sums = all_reduce(torch.stack([count, sums]))
    mean = sums / count
    deviations = [(v.double() - m).square().sum() for v, m in zip(local, mean, strict=True)]
    m2 = all_reduce(torch.stack(deviations))
    return [(m, math.sqrt(var)) for m, var in zip(mean.tolist(), (m2 / count).tolist(), strict=True)]


def describe_shard(name: str, p: torch.Tensor, local: torch.Tensor, mean: float, std: float) -> LayerInfo:
    """A sharded layer's table entry: the full shape, the values this rank holds (maybe none),
    its shard's place, and histogram edges from the full tensor's moments, so that every shard
    declares the same edges (the collector refuses a layer whose ranks disagree)."""
    index, count = shard_position(p.placements, p.device_mesh.get_coordinate(), p.device_mesh.shape)
    lo, hi = physics.histogram_edges(mean, std)
    dtype = str(p.dtype).removeprefix("torch.")
    return LayerInfo(name, tuple(p.shape), local.numel(), dtype, index, count, lo, hi)


def describe_slice(
    name: str, p: torch.Tensor, dim: int, tp: TensorParallel, mean: float, std: float
) -> LayerInfo:
    """A tensor-parallel slice's table entry, declared as a DTensor's shard is: the full shape (the
    slice's, `size` times along `dim`), the values this rank holds, its slice's place (`rank` of
    `size`), and histogram edges from the full tensor's moments (`slice_moments`)."""
    shape = list(p.shape)
    shape[dim] *= tp.size
    lo, hi = physics.histogram_edges(mean, std)
    dtype = str(p.dtype).removeprefix("torch.")
    return LayerInfo(name, tuple(shape), p.numel(), dtype, tp.rank, tp.size, lo, hi)
