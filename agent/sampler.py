"""Measure a model on sampled steps, on its own device, without stalling the training loop.

The sampler owns the hooks. They are registered only for a sampled step (`arm`) and
removed right after it (`disarm`), so an unsampled step runs with no hook at all. On a
sampled step:

* forward pre-hooks / hooks on activation sites add the power sums (n, sum z, sum z^2) of the
  pre-activations z and of the activations a (pre-hooks see z before an in-place activation
  overwrites it; several calls of one module in a step add up);
* the optimizer's step pre-hook reads, per parameter tensor theta with gradient g, sum theta,
  sum theta^2 and <g, theta> (the step's state theta_t, paired with its loss E_t); the post-hook
  reads <g, theta_{t+1}>. Work w = <g, theta_{t+1}> - <g, theta_t> needs no parameter copy;
  the two dots cancel to a small difference, so they accumulate in float64 (docs/science.md section 2);
* the shape measurements, which change slowly, run on every SHAPE_EVERY-th sample: at the
  first optimizer pre-hook of the step (or at `collect` when none ran) every layer's histogram
  is counted on fixed edges over a fixed, seeded subset of at most `subset` values (the same
  indices every time, so changes are paired, not resampled noise), and each activation site
  runs its engine-type scale probe;
* `collect` packs everything into one float64 tensor and starts its copy to the host
  (non-blocking from pinned memory on CUDA): the host reads it later, on the sender thread.

Small tensors (biases, norms) are measured together from one flat copy with segment sums,
since per-op dispatch (~10 us) would otherwise dominate models with hundreds of them.

Sharded parameters (DTensors, as FSDP2's `fully_shard` makes them) are measured on the shard
this rank holds, their gradients likewise (a histogram counts a subset of each shard): the
statistics of the shards merge exactly in the collector (docs/science.md section 3). Which layers are
sharded is found once, at construction, so that a model of plain tensors pays nothing for
it. A sharded layer's histogram edges come from the full tensor, so that all its shards
share them: constructing a `Sampler` over sharded parameters is then a collective, which
every rank of their device mesh must make (`_full_moments`).
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from thermoscope.science import physics
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats

#: Module classes that are activation sites by default.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
)

#: Tensors with fewer values than this are measured together (see module docstring).
SMALL_NUMEL = 1 << 16
#: The work dots are BLAS float32 dots over blocks of this many values, added up in float64.
#: A float64 reduction of the products would be more exact but costs a float32 product
#: temporary and, on CPU, a float64 copy too (measured: 0.28 ms per 1M values, 63 ms at 16M,
#: against 0.08 ms blocked; on an H200, 0.16 ms against 0.05 ms at 16M). Measured relative
#: error of the work against exact float64 when the update is 1e-4 of the weights: 7e-5 on
#: CPU (2e-3 at 1e-6), 3e-7 on CUDA, whose dot reduces as a tree.
DOT_BLOCK = {"cpu": 1 << 18, "cuda": 1 << 24}

#: Histogram settings: bins between the fixed edges, and the most values of a layer counted.
BINS = 512
SUBSET = 1 << 16
#: The engine-type probe: values of z it uses, the scales it applies.
PROBE_VALUES = 4096
PROBE_SCALES = (0.5, 2.0)
#: Samples between shape measurements (histograms and probes): they cost more than the
#: moments (~2.4 ms against ~0.4 ms for the reference model on 2 CPU cores) and move slowly.
SHAPE_EVERY = 10

#: Every layer's (sum, sum of squares, histogram counts or None) at theta_t.
_State = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]

_LAYER_COLUMNS = 4  # sum, sum of squares, <g, theta_t>, <g, theta_{t+1}>
_SITE_COLUMNS = 5  # sum z, sum z^2, sum a, sum a^2, probe spread (the counts stay on the host)


def find_sites(model: nn.Module, extra: Iterable[nn.Module] = ()) -> list[tuple[str, nn.Module]]:
    """Activation modules of `model`, plus user-marked ones, in module order.

    `nn.Identity` counts when it stands as an activation: inside an `nn.Sequential`, or
    under an attribute named like one (`act`, `activation`, ...). Its efficiency is 0 and
    it leaves the network's efficiency unchanged, as a linear map should.
    """
    marked = {id(m) for m in extra}
    parents = {id(child) for m in model.modules() if isinstance(m, nn.Sequential) for child in m.children()}
    sites = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_identity_activation = isinstance(module, nn.Identity) and (
            id(module) in parents or leaf.startswith("act")
        )
        if isinstance(module, ACTIVATIONS) or is_identity_activation or id(module) in marked:
            sites.append((name, module))
    return sites


def _sumsq(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float32, torch.float64):
        return torch.dot(t, t)
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t itself in float32/float64, else a float32 copy (bf16 products would round away the work)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _dot64(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """<g, p> of two flat tensors: float32 dots over blocks, float64 across them (DOT_BLOCK)."""
    block = DOT_BLOCK.get(p.device.type, DOT_BLOCK["cpu"])
    if p.numel() <= block:
        return torch.dot(_wide(g), _wide(p)).double()
    parts = [torch.dot(_wide(gc), _wide(pc)) for gc, pc in zip(g.split(block), p.split(block), strict=True)]
    return torch.stack(parts).sum(dtype=torch.float64)


@dataclass
class Pending:
    """A sampled step on its way to the host: read it with `to_sample` (may wait for the copy)."""

    step: int
    wall_time: float
    packed: torch.Tensor
    ready: torch.cuda.Event | None
    layer_count: np.ndarray
    site_count: np.ndarray
    bins: int
    has_histogram: bool
    energy: float | None  # known on the host already, else the last packed value

    def to_sample(self) -> Sample:
        if self.ready is not None:
            self.ready.synchronize()
        values = self.packed.numpy()
        n_layers, n_sites = len(self.layer_count), len(self.site_count)
        hist_size = n_layers * (self.bins + 2) if self.has_histogram else 0
        layer, site, hist = np.split(
            values[: n_layers * _LAYER_COLUMNS + n_sites * _SITE_COLUMNS + hist_size],
            [n_layers * _LAYER_COLUMNS, n_layers * _LAYER_COLUMNS + n_sites * _SITE_COLUMNS],
        )
        layer = layer.reshape(_LAYER_COLUMNS, n_layers)
        site = site.reshape(_SITE_COLUMNS, n_sites)
        count = self.layer_count.astype(np.float64)
        mean = layer[0] / np.maximum(count, 1)
        n_site = self.site_count.astype(np.float64)
        with np.errstate(
            divide="ignore", invalid="ignore"
        ):  # a diverged run has inf here: the wire refuses it
            in_mean = np.where(n_site > 0, site[0] / n_site, 0.0)
            out_mean = np.where(n_site > 0, site[2] / n_site, 0.0)
            in_m2 = np.maximum(site[1] - n_site * in_mean * in_mean, 0.0)
            out_m2 = np.maximum(site[3] - n_site * out_mean * out_mean, 0.0)
            m2 = np.maximum(layer[1] - count * mean * mean, 0.0)
        return Sample(
            step=self.step,
            wall_time=self.wall_time,
            energy=float(values[-1]) if self.energy is None else self.energy,
            layers=LayerStats(
                count=self.layer_count,
                mean=mean,
                m2=m2,
                dot_before=layer[2].copy(),
                dot_after=layer[3].copy(),
                histogram=hist.reshape(n_layers, self.bins + 2).astype(np.int64) if hist_size else None,
            ),
            sites=SiteStats(
                count=self.site_count,
                in_mean=in_mean,
                in_m2=in_m2,
                out_mean=out_mean,
                out_m2=out_m2,
                probe_spread=site[4].copy(),
            ),
        )


class Sampler:
    """Hooks and device-side statistics for one model; see the module docstring."""

    def __init__(
        self,
        layers: Sequence[tuple[str, torch.Tensor]],
        sites: Sequence[tuple[str, nn.Module]],
        optimizers: Sequence[torch.optim.Optimizer] | None = None,
        *,
        bins: int = BINS,
        subset: int = SUBSET,
        seed: int = 0,
    ) -> None:
        if not layers:
            raise ValueError("the model has no parameters to watch")
        if bins < 1 or subset < 1:
            raise ValueError(f"bins and subset must be positive, got {bins} and {subset}")
        self.params = [p for _, p in layers]  # the Parameter objects: optimizers know them by id
        dtensor = _dtensor_type()
        self._sharded = (
            [] if dtensor is None else [i for i, p in enumerate(self.params) if isinstance(p, dtensor)]
        )
        values = self._read_values()
        self.bins = bins
        moments = _full_moments([self.params[i] for i in self._sharded], [values[i] for i in self._sharded])
        full = dict(zip(self._sharded, moments, strict=True))
        self.layers = [
            _describe_shard(name, p, values[i], *full[i]) if i in full else _describe(name, p)
            for i, (name, p) in enumerate(layers)
        ]
        self.sites = [SiteInfo(name=n, kind=type(m).__name__) for n, m in sites]
        self._site_modules = [m for _, m in sites]
        # the probe calls forward() again: only on stateless modules (no running statistics)
        self._probed = [next(m.buffers(), None) is None for m in self._site_modules]
        self._optimizers = list(optimizers) if optimizers is not None else None
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._layer_count = np.array([v.numel() for v in values], dtype=np.int64)
        self._device = values[0].device
        self._handles: list = []
        self._samples = 0
        self._small = [i for i, v in enumerate(values) if v.numel() < SMALL_NUMEL]
        self._small_pos = {i: k for k, i in enumerate(self._small)}
        # Built once, here: a host-to-device copy during a step would make CUDA wait.
        self._seg = _segments([values[i].numel() for i in self._small], self._device)
        self._subsets = [
            _subset(layer.name, v.numel(), subset, seed, self._device)
            for layer, v in zip(self.layers, values, strict=True)
        ]
        self._hist_seg = _segments([min(v.numel(), subset) for v in values], self._device)
        self._hist_offset = self._hist_seg * (bins + 2) + 1
        self._hist_lo = torch.tensor([layer.hist_lo for layer in self.layers], device=self._device)
        self._hist_scale = torch.tensor(
            [bins / (layer.hist_hi - layer.hist_lo) for layer in self.layers], device=self._device
        )
        self._reset()

    # -- arming ---------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        """Register the hooks for the coming step."""
        if self._handles:
            return
        self._reset()
        for i, module in enumerate(self._site_modules):
            self._handles.append(module.register_forward_pre_hook(self._site_in_hook(i)))
            self._handles.append(module.register_forward_hook(self._site_out_hook(i)))
        if self._optimizers is None:
            self._handles.append(register_optimizer_step_pre_hook(self._before_step))
            self._handles.append(register_optimizer_step_post_hook(self._after_step))
        else:
            for o in self._optimizers:
                self._handles.append(o.register_step_pre_hook(self._before_step))
                self._handles.append(o.register_step_post_hook(self._after_step))

    def disarm(self) -> None:
        """Remove every hook: an unsampled step costs nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _reset(self) -> None:
        n_sites = len(self._site_modules)
        self._values: list[torch.Tensor] | None = None
        self._state: _State | None = None
        self._dot_before: dict[int, torch.Tensor] = {}
        self._dot_after: dict[int, torch.Tensor] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._site_in: list[torch.Tensor | None] = [None] * n_sites  # z sums of the call
        self._site_sums: list[list[torch.Tensor]] = [[] for _ in range(n_sites)]  # one row per call
        self._site_count = np.zeros(n_sites, dtype=np.int64)
        self._probe: list[torch.Tensor | None] = [None] * n_sites

    # -- activation sites -------------------------------------------------------------------

    def _site_in_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                with torch.no_grad():
                    z = args[0].detach()
                    self._site_in[i] = _power_sums(z)
                    if self._probe[i] is None and self._probed[i] and self._shape_sample:
                        self._probe[i] = _scale_probe(module, z)

        return hook

    def _site_out_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            z_sums, self._site_in[i] = self._site_in[i], None
            if isinstance(output, torch.Tensor) and z_sums is not None:
                with torch.no_grad():
                    a = output.detach()
                    a_sums = _power_sums(a)
                    self._site_sums[i].append(torch.cat([z_sums, a_sums]))
                    self._site_count[i] += a.numel()

        return hook

    # -- parameters ---------------------------------------------------------------------------

    def _read_values(self) -> list[torch.Tensor]:
        """Each layer's values on this rank: the parameter, or the local shard of a DTensor."""
        if not self._sharded:
            return self.params
        values = list(self.params)
        for i in self._sharded:
            values[i] = values[i].to_local()
        return values

    def _held(self) -> list[torch.Tensor]:
        """`_read_values`, once per sampled step (`to_local` is an autograd call per tensor; the
        optimizer updates the shards in place). Read at the step, not kept from construction:
        FSDP2 may replace a shard's local tensor on the model's first forward (its lazy init)."""
        if self._values is None:
            self._values = self._read_values()
        return self._values

    def _owned(self, optimizer: torch.optim.Optimizer) -> list[int]:
        return [
            self._index[id(p)]
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) in self._index
        ]

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._state is None:  # the first optimizer of the step: every layer is still at theta_t
            self._state = self._measure_state()
        idx = self._owned(optimizer)
        grads = {i: g for i in idx if (g := self.params[i].grad) is not None}
        for i in self._sharded:  # a DTensor's gradient is one too
            if i in grads:
                grads[i] = grads[i].to_local()
        self._grads.update(grads)
        self._dot_before.update(self._dots(idx))

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._dot_after.update(self._dots(self._owned(optimizer)))

    @property
    def _shape_sample(self) -> bool:
        return self._samples % SHAPE_EVERY == 0

    def _measure_state(self) -> _State:
        """(sum, sum of squares, histogram or None) of every layer: large tensors one at a time,
        small ones together from one flat copy, histograms all together from the layers' subsets."""
        sums: list[torch.Tensor] = []
        sumsqs: list[torch.Tensor] = []
        flats = [v.detach().reshape(-1) for v in self._held()]
        if self._small:
            flat = _flat64([flats[i] for i in self._small])
            small_sums = _segment_sum(flat, self._seg, len(self._small))
            small_sumsqs = _segment_sum(flat * flat, self._seg, len(self._small))
        for i, p in enumerate(flats):
            if i in self._small_pos:
                sums.append(small_sums[self._small_pos[i]])
                sumsqs.append(small_sumsqs[self._small_pos[i]])
            else:
                sums.append(p.sum(dtype=torch.float32))
                sumsqs.append(_sumsq(p))
        # stack and cat promote the float32 sums of large tensors to float64
        return torch.stack(sums), torch.stack(sumsqs), self._histogram(flats) if self._shape_sample else None

    def _histogram(self, flats: list[torch.Tensor]) -> torch.Tensor:
        """Counts (layers x (bins + 2)) of every layer's subset: below lo, the bins, at or above hi."""
        subsets = zip(flats, self._subsets, strict=True)
        values = _wide(torch.cat([p if idx is None else p.index_select(0, idx) for p, idx in subsets]))
        seg = self._hist_seg
        bins = ((values - self._hist_lo[seg]) * self._hist_scale[seg]).floor_()
        bins = bins.nan_to_num_(nan=-1.0).clamp_(-1, self.bins)  # a NaN weight counts as outside
        # bin k of layer l counts at l * (bins + 2) + k + 1
        slot = bins.long().add_(self._hist_offset)
        counts = torch.zeros(len(flats) * (self.bins + 2), device=values.device)
        return counts.index_add_(0, slot, torch.ones_like(values))

    def _dots(self, idx: list[int]) -> dict[int, torch.Tensor]:
        """<g, theta> in float64 of the layers in idx with a saved gradient (current theta)."""
        idx = [i for i in idx if i in self._grads]
        values = self._held()
        dots = {
            i: _dot64(self._grads[i].reshape(-1), values[i].detach().reshape(-1))
            for i in idx
            if i not in self._small_pos
        }
        small = [i for i in idx if i in self._small_pos]
        if small:
            grads = [self._grads.get(i, torch.zeros_like(values[i])) for i in self._small]
            flat = _flat64([values[i] for i in self._small])
            products = _segment_sum(_flat64(grads) * flat, self._seg, len(self._small))
            dots.update({i: products[self._small_pos[i]] for i in small})
        return dots

    # -- collecting ----------------------------------------------------------------------------

    @torch.no_grad()
    def collect(self, step: int, loss: torch.Tensor | float | None) -> Pending:
        """Pack this step's statistics and start their copy to the host; reset for the next step."""
        sums, sumsqs, hist = self._state if self._state is not None else self._measure_state()
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        before = [self._dot_before.get(i, zero) for i in range(len(self.params))]
        after = [self._dot_after.get(i, zero) for i in range(len(self.params))]
        columns = [sums, sumsqs, torch.stack(before), torch.stack(after)]
        if self._site_modules:
            empty = torch.zeros(_SITE_COLUMNS - 1, dtype=torch.float64, device=self._device)
            unprobed = torch.full((), -1.0, dtype=torch.float64, device=self._device)
            rows = [
                torch.cat(
                    [
                        torch.stack(calls).sum(0).to(self._device) if calls else empty,
                        (unprobed if probe is None else probe.to(self._device)).reshape(1),
                    ]
                )
                for calls, probe in zip(self._site_sums, self._probe, strict=True)
            ]
            columns.extend(torch.stack(rows).T)
        if hist is not None:
            columns.append(hist)
        energy: float | None = math.nan if loss is None else None
        if isinstance(loss, torch.Tensor):
            columns.append(loss.detach().reshape(-1)[:1].to(device=self._device, dtype=torch.float64))
        elif loss is not None:
            energy = float(loss)
        packed = torch.cat([c.reshape(-1) for c in columns]).double()
        site_count, has_histogram = self._site_count, hist is not None
        self._reset()
        self._samples += 1
        ready = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            packed = host
        return Pending(
            step, time.time(), packed, ready, self._layer_count, site_count, self.bins, has_histogram, energy
        )


def _describe(name: str, p: torch.Tensor) -> LayerInfo:
    """A layer's table entry, with histogram edges fixed from its initial statistics."""
    with torch.no_grad():
        values = _wide(p.detach())
        std, mean = (
            torch.std_mean(values, correction=0) if p.numel() > 1 else (torch.zeros(()), values.mean())
        )
    lo, hi = physics.histogram_edges(float(mean), float(std))
    dtype = str(p.dtype).removeprefix("torch.")
    return LayerInfo(name=name, shape=tuple(p.shape), numel=p.numel(), dtype=dtype, hist_lo=lo, hist_hi=hi)


def _dtensor_type() -> type | None:
    """torch's DTensor class if torch.distributed.tensor is loaded, else None: a parameter can
    only be a DTensor once it is, and importing it here would add ~0.5 s to every start."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _shard_position(
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


def _full_moments(params: list[torch.Tensor], shards: list[torch.Tensor]) -> list[tuple[float, float]]:
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


def _describe_shard(name: str, p: torch.Tensor, local: torch.Tensor, mean: float, std: float) -> LayerInfo:
    """A sharded layer's table entry: the full shape, the values this rank holds (maybe none),
    its shard's place, and histogram edges from the full tensor's moments, so that every shard
    declares the same edges (the collector refuses a layer whose ranks disagree)."""
    index, count = _shard_position(p.placements, p.device_mesh.get_coordinate(), p.device_mesh.shape)
    lo, hi = physics.histogram_edges(mean, std)
    dtype = str(p.dtype).removeprefix("torch.")
    return LayerInfo(name, tuple(p.shape), local.numel(), dtype, index, count, lo, hi)


def _subset(name: str, numel: int, size: int, seed: int, device: torch.device) -> torch.Tensor | None:
    """The fixed, seeded indices of a layer's histogram subset (None: the whole layer).

    Seeded by the layer's name, so that every replica of the layer counts the same values.
    """
    if numel <= size:
        return None
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randperm(numel, generator=gen)[:size].sort().values.to(device=device, dtype=torch.int32)


def _segments(sizes: list[int], device: torch.device) -> torch.Tensor:
    """Segment number of each value when tensors of these sizes are laid end to end."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)).to(device)


def _scale_probe(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """max over c of |eta(c z) - eta(z)| on a strided subsample of z, with the site's own
    activation (docs/science.md section 5); -1 where it cannot be measured (no spread, or the module
    does not take a single tensor)."""
    flat = z.reshape(-1)
    sub = flat[:: max(1, flat.numel() // PROBE_VALUES)][:PROBE_VALUES]
    try:
        etas = []
        for c in (1.0, *PROBE_SCALES):
            zc = sub * c
            var_in = zc.double().var(correction=0)
            etas.append(1 - module.forward(zc).double().var(correction=0) / var_in)
    except (TypeError, RuntimeError):
        return torch.full((), -1.0, dtype=torch.float64, device=z.device)
    eta = torch.stack(etas)
    return torch.nan_to_num((eta[1:] - eta[0]).abs().max(), nan=-1.0)


def _power_sums(t: torch.Tensor) -> torch.Tensor:
    """(sum t, sum t^2) of an activation in float32 (cascade sum and BLAS dot: no float64 copy on CPU)."""
    flat = _wide(t.reshape(-1))
    return torch.stack([flat.sum(), _sumsq(flat)])


def _flat64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One float64 copy of many small tensors, end to end (one cat and one cast)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def _segment_sum(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, seg, values)
