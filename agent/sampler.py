"""Measure a model on sampled steps, on its own device, without stalling the training loop.

The sampler owns the hooks. They are registered only for a sampled step (`arm`) and
removed right after it (`disarm`), so an unsampled step runs with no hook at all. On a
sampled step:

* forward pre-hooks / hooks on activation sites add the power sums (n, sum z, sum z^2) of the
  pre-activations z and of the activations a (pre-hooks see z before an in-place activation
  overwrites it; several calls of one module in a step add up); activation functions a forward
  calls (`FUNCTIONS`) are caught by a torch function mode entered inside the model's forward,
  named by the running module (`_FunctionalSites`), and add theirs the same way. Compiled code
  runs eagerly on a sampled step (dynamo's force_eager stance), so no hook makes it recompile;
* the optimizer's step pre-hook reads, per parameter tensor theta, sum theta and sum theta^2
  (the step's state theta_t, paired with its loss E_t), and keeps theta_t on this step's work
  coordinates: all of a layer of at most `subset` values, else `subset` of them in blocks of
  neighbouring values (`coords.Coordinates`: the layer's fixed blocks shifted by a fresh random
  number of blocks). `collect` turns them into the update d_t = theta_{t+1} - theta_t on those
  coordinates and arms a one-shot optimizer pre-hook for the NEXT step (`following`): there the
  next minibatch's gradient g_{t+1} gives the work w+_t = <g_{t+1}, d_t> (its blocks weighted by
  n/k: unbiased), which the next sample carries as <g_{t+1}, theta_{t+1}> - <g_{t+1}, theta_t>,
  both estimated on the same coordinates (their difference, the work, is what they are read
  for). The same-batch work <g_t, d_t> is biased by the minibatch noise; w+ is not, since
  g_{t+1} is independent of d_t (docs/science.md section 2);
* the shape measurements, which change slowly, run on every SHAPE_EVERY-th sample: at the
  first optimizer pre-hook of the step (or at `collect` when none ran) every layer's histogram
  is counted on fixed edges over its fixed, seeded blocks of at most `subset` values (the same
  values every time, so changes are paired, not resampled noise), and each activation site
  runs its engine-type scale probe;
* `collect` packs everything into one float64 tensor and starts its copy to the host
  (non-blocking from pinned memory on CUDA): the host reads it later, on the sender thread.

Small tensors (biases, norms) are measured together from one float64 copy with segment sums,
since per-op dispatch (~10 us) would otherwise dominate models with hundreds of them; on CUDA
the large ones of a dtype together too (`reduce.Buckets`), so that a sample's launches do not
grow with the number of tensors.

Sharded parameters (DTensors, as FSDP2's `fully_shard` makes them) are measured on the shard
this rank holds, their gradients likewise (a histogram counts a subset of each shard): the
statistics of the shards merge exactly in the collector (docs/science.md section 3). Which layers are
sharded is found once, at construction, so that a model of plain tensors pays nothing for
it. A sharded layer's histogram edges come from the full tensor, so that all its shards
share them: constructing a `Sampler` over sharded parameters is then a collective, which
every rank of their device mesh must make (`_full_moments`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode

from thermoscope.science import physics
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats

from .clip import ClipWatch
from .coords import Coordinates
from .reduce import BUCKET, Buckets
from .sites import FUNCTIONS, plain_name, scale_probe

log = logging.getLogger("thermoscope.agent")

#: Tensors with fewer values than this are measured together (see module docstring).
SMALL_NUMEL = 1 << 16
#: Histogram settings: bins between the fixed edges, and the most values of a layer counted.
BINS = 512
SUBSET = 1 << 16
#: Samples between shape measurements (histograms and probes): they cost more than the
#: moments (~2.4 ms against ~0.4 ms for the reference model on 2 CPU cores) and move slowly.
SHAPE_EVERY = 10

#: Every layer's (sum, sum of squares, histogram counts or None) at theta_t.
_State = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
#: Values at a step's work coordinates: (blocks per layer, None for all; large layers one by one;
#: the small ones end to end in float64).
_Picked = tuple[list[torch.Tensor | None], dict[int, torch.Tensor], torch.Tensor | None]

_LAYER_COLUMNS = 4  # sum, sum of squares, <g, theta_t>, <g, theta_{t+1}>
_SITE_COLUMNS = 5  # sum z, sum z^2, sum a, sum a^2, probe spread (the counts stay on the host)


def _sumsq(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float32, torch.float64):
        return torch.dot(t, t)
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate a float64 tensor's sum in float64 (its own precision), any other in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t itself in float32/float64, else a float32 copy (bf16 products would round away the work)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


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
        model: nn.Module,
        layers: Sequence[tuple[str, torch.Tensor]],
        sites: Sequence[tuple[str, nn.Module]],
        optimizers: Sequence[torch.optim.Optimizer] | None = None,
        *,
        bins: int = BINS,
        subset: int = SUBSET,
        seed: int = 0,
        fused: bool | None = None,
    ) -> None:
        """`model`: whose forwards the first sampled step watches for activation functions
        (`FUNCTIONS`); each one found there becomes a site, measured from then on, and the site
        table is settled by that step's `collect` (`settled`). `fused`: the large layers' sums in
        a bounded number of device ops (`reduce.Buckets`; None: on CUDA only)."""
        if not layers:
            raise ValueError("the model has no parameters to watch")
        if bins < 1:
            raise ValueError(f"bins must be positive, got {bins}")
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
        self._model = model
        self._functions: dict[str, int] = {}  # a functional site's name -> its site index
        self._running: list[str | None] = []  # the modules whose forward runs (None: a module site)
        self._mode = _FunctionalSites(self)
        self._eager: object | None = None  # torch.compile's force_eager stance while armed
        self._unlisted_logged = False
        self._optimizers = list(optimizers) if optimizers is not None else None
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._layer_count = np.array([v.numel() for v in values], dtype=np.int64)
        self._device = values[0].device
        self._handles: list = []
        self._clip = ClipWatch(self.params, self._device)  # gradient clipping, undone in the work
        self._samples = 0
        self._follow_handles: list = []
        self._before: _Picked | None = None  # theta_t on the work coordinates, until the next step
        # per layer, <g_{t+1}, d_t> and <g_{t+1}, theta_{t+1}> (the work and the dot after it)
        self._follow_dots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._small = [i for i, v in enumerate(values) if v.numel() < SMALL_NUMEL]
        self._small_pos = {i: k for k, i in enumerate(self._small)}
        # Built once, here: a host-to-device copy during a step would make CUDA wait.
        small_sizes = [values[i].numel() for i in self._small]
        self._lengths = torch.tensor(small_sizes, dtype=torch.long).to(self._device)
        if fused is None:
            fused = self._device.type == "cuda"
        # the large layers a bucket holds (larger ones are read one by one: a few launches per
        # BUCKET values read, and no copy of them)
        self._bucketed = [i for i, v in enumerate(values) if fused and SMALL_NUMEL <= v.numel() <= BUCKET]
        self._alone = [
            i for i, v in enumerate(values) if v.numel() >= SMALL_NUMEL and i not in self._bucketed
        ]
        # the layers' places in the groups' results laid end to end (small, bucketed, alone)
        self._state_order = (
            torch.tensor(self._small + self._bucketed + self._alone, dtype=torch.long)
            .argsort()
            .to(self._device)
        )
        self._buckets = (
            Buckets(
                [values[i].numel() for i in self._bucketed],
                [values[i].dtype for i in self._bucketed],
                self._device,
            )
            if self._bucketed
            else None
        )
        # where a sample reads each layer: its histogram's values and its work's
        self._coords = Coordinates(
            [layer.name for layer in self.layers], [v.numel() for v in values], subset, seed, self._device
        )
        # what a layer's work dots are multiplied by: n/k on blocks without a tail (`Coordinates`)
        self._scales = torch.tensor(
            [1.0 if i in self._small_pos else self._coords.scale(i) for i in range(len(values))],
            dtype=torch.float64,
        ).to(self._device)
        # each sample counts the histograms of one share of the layers (`shares`), so that no
        # sample costs much more than another; the shares' device tensors are built here, once
        self._counted = [self._coords.counted(i) for i in range(len(values))]
        self._shares = [
            self._histogram_share(share)
            for share in shares([min(math.prod(layer.shape), subset) for layer in self.layers], SHAPE_EVERY)
        ]
        self._first: _HistogramShare | None = None  # the first sample's (`_first_share`)
        self._number = 0  # the coming sample's number in the run (`arm`)
        self._reset()

    def _histogram_share(self, layers: list[int]) -> _HistogramShare:
        return _HistogramShare(layers, self._counted, self.layers, self.bins, self._device)

    # -- arming ---------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, number: int = 0) -> None:
        """Register the hooks for the coming step, the run's sample `number` (its optimizer step
        // every, which every rank agrees on: it chooses the share of histograms and probes)."""
        if self._handles:
            return
        self._number = number
        if not self.settled:
            self._first = self._first_share()
        self._reset()
        for i, module in enumerate(self._site_modules):
            self._handles.append(module.register_forward_pre_hook(self._site_in_hook(i)))
            self._handles.append(module.register_forward_hook(self._site_out_hook(i), always_call=True))
        if not self.settled or self._functions:
            self._track(self._model)
        self._eager = _force_eager()
        self._handles.extend(self._step_pre_hooks(self._before_step))

    def _step_pre_hooks(self, hook) -> list:
        if self._optimizers is None:
            return [register_optimizer_step_pre_hook(hook)]
        return [o.register_step_pre_hook(hook) for o in self._optimizers]

    @property
    def following(self) -> bool:
        """True while the step after a sample has its work hook (one optimizer pre-hook)."""
        return bool(self._follow_handles)

    def unfollow(self) -> None:
        """Remove the next step's work hook (call after that step); its dots wait for `collect`."""
        for handle in self._follow_handles:
            handle.remove()
        self._follow_handles.clear()
        self._clip.stop()
        self._before = None

    def disarm(self) -> None:
        """Remove every hook: an unsampled step costs nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._running.clear()
        if self._eager is not None:
            self._eager.__exit__(None, None, None)  # type: ignore[attr-defined]
            self._eager = None

    @property
    def settled(self) -> bool:
        """True once the site table can grow no more (after the first sampled step's `collect`)."""
        return self._samples > 0

    def _track(self, model: nn.Module) -> None:
        """Hooks that keep the stack of running modules, for `_FunctionalSites` to name the module
        that calls an activation function; the model's own enter and leave the mode (always_call:
        also when its forward raises), so that nothing outside the model's forward is caught."""
        sites = {id(m) for m in self._site_modules}
        for name, module in model.named_modules():
            if id(module) in sites:
                continue
            root = module is model
            self._handles.append(module.register_forward_pre_hook(self._enter(plain_name(name), root)))
            self._handles.append(module.register_forward_hook(self._leave(root), always_call=True))

    def _enter(self, name: str, root: bool):
        def hook(module: nn.Module, args: tuple) -> None:
            if root and not self._running:
                self._mode.__enter__()
            self._running.append(name)

        return hook

    def _leave(self, root: bool):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._running:
                self._running.pop()
            if root and not self._running:
                self._mode.__exit__(None, None, None)

        return hook

    def _reset(self) -> None:
        n_sites = len(self.sites)
        self._values: list[torch.Tensor] | None = None
        self._state: _State | None = None
        self._theta: _Picked | None = None  # theta_t at the work coordinates
        self._site_in: list[torch.Tensor | None] = [None] * n_sites  # z sums of the call
        self._site_sums: list[list[torch.Tensor]] = [[] for _ in range(n_sites)]  # one row per call
        self._site_count = np.zeros(n_sites, dtype=np.int64)
        self._probe: list[torch.Tensor | None] = [None] * n_sites

    # -- activation sites -------------------------------------------------------------------

    def _site_in_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._running.append(None)  # the functions it calls are its own, not sites
            if args and isinstance(args[0], torch.Tensor):
                with torch.no_grad():
                    z = args[0].detach()
                    self._site_in[i] = _power_sums(z)
                    if self._probe[i] is None and self._probed[i] and self._probe_due(i):
                        self._probe[i] = scale_probe(module.forward, z)

        return hook

    def _site_out_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._running:
                self._running.pop()
            z_sums, self._site_in[i] = self._site_in[i], None
            if z_sums is not None:
                self._add_call(i, z_sums, output)

        return hook

    def _functional(self, owner: str, name: str, func: Callable, args: tuple, kwargs: dict) -> object:
        """Call an activation function for the module `owner`, adding the power sums of its input
        and output to the site `owner:name` (made on the first sampled step; after it, a site
        not in the table is left unmeasured and said once)."""
        site = f"{owner}:{name}"
        i = self._functions.get(site)
        if i is None and self.settled:
            if not self._unlisted_logged:
                self._unlisted_logged = True
                log.warning(
                    "thermoscope: %s first ran after the site table was declared; it is not measured",
                    site,
                )
            return func(*args, **kwargs)
        if i is None:
            i = self._functions[site] = len(self.sites)
            self.sites.append(SiteInfo(name=site, kind=f"{name}()"))
            self._probed.append(True)
            self._site_in.append(None)
            self._site_sums.append([])
            self._site_count = np.append(self._site_count, 0)
            self._probe.append(None)
        with torch.no_grad():
            z = args[0].detach()
            z_sums = _power_sums(z)  # before the call: an in-place function overwrites z
            if self._probe[i] is None and self._probe_due(i):
                rest = {k: v for k, v in kwargs.items() if k != "out"}
                self._probe[i] = scale_probe(lambda t: func(t, *args[1:], **rest), z)
        output = func(*args, **kwargs)
        self._add_call(i, z_sums, output)
        return output

    @torch.no_grad()
    def _add_call(self, i: int, z_sums: torch.Tensor, output: object) -> None:
        """One call of site i: its input's power sums and its output's, and the values it made."""
        if isinstance(output, torch.Tensor):
            self._site_sums[i].append(torch.cat([z_sums, _power_sums(output.detach())]))
            self._site_count[i] += output.numel()

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
        """`_read_values` as flat, detached views, once per sampled step and once on the step after
        it (`to_local` is an autograd call per tensor; the optimizer updates the values in place).
        Read at the step, not kept from construction: FSDP2 may replace a shard's local tensor on
        the model's first forward (its lazy init)."""
        if self._values is None:
            self._values = [v.detach().reshape(-1) for v in self._read_values()]
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
            small = _flat64([self._held()[i] for i in self._small]) if self._small else None
            self._state = self._measure_state(small)
            self._theta = self._pick(self._coords.draw(), small)

    def held_bytes(self) -> int:
        """Bytes of tensors the sampler keeps between steps: the blocks and the shares' indices, the
        small layers' sizes, and theta_t on a sample's work coordinates until the next step."""
        kept = [self._lengths, self._scales]
        if self._before is not None:
            rows, large, small = self._before
            kept += (
                [t for t in rows if t is not None] + list(large.values()) + ([] if small is None else [small])
            )
        held = sum(t.numel() * t.element_size() for t in kept) + self._coords.nbytes()
        return held + sum(s.nbytes() for s in self._shares)

    @property
    def _share(self) -> _HistogramShare:
        """The layers this sample counts histograms of: share number % SHAPE_EVERY of `_shares`,
        chosen by the run's sample number, not this process's count, so that a worker restarted
        mid-run counts the same layers as the other ranks at each step; more on its first sample
        (`_first_share`)."""
        if not self.settled and self._first is not None:
            return self._first
        return self._shares[self._number % SHAPE_EVERY]

    def _first_share(self) -> _HistogramShare:
        """The first sample's layers: every layer held whole, so that the first reading has their
        shapes (a rank counting a whole layer the others do not count adds a whole histogram or
        none: the collector takes one rank's row of it), but a sharded layer only on its own share,
        since a shard's histogram alone, merged, would read as the layer's."""
        share = set(self._shares[self._number % SHAPE_EVERY].layers)
        sharded = set(self._sharded)
        return self._histogram_share([i for i in range(len(self.layers)) if i not in sharded or i in share])

    @property
    def shape_sample(self) -> bool:
        """Whether this sample counts any histogram (its share of the layers is not empty)."""
        return bool(self._share.layers)

    def _probe_due(self, site: int) -> bool:
        """Site i is probed on one sample in SHAPE_EVERY by the sample's number, spread as the
        layers (a site's probe is this rank's own reading: on its first sample, all of them)."""
        return not self.settled or site % SHAPE_EVERY == self._number % SHAPE_EVERY

    def _measure_state(self, small: torch.Tensor | None = None) -> _State:
        """(sum, sum of squares, histogram or None) of every layer: small tensors together from
        one flat copy (`small`, when the caller made it already), large ones together in buckets
        where fused (`reduce.Buckets`), else one at a time; histograms from the layers' subsets."""
        flats = self._held()
        sums: list[torch.Tensor] = []  # the groups' results end to end, in `_state_order`'s order
        sumsqs: list[torch.Tensor] = []
        if self._small:
            flat = _flat64([flats[i] for i in self._small]) if small is None else small
            sums.append(_segment_sum(flat, self._lengths))
            sumsqs.append(_segment_sum(flat * flat, self._lengths))
        if self._buckets is not None:
            s, q = self._buckets.moments([flats[i] for i in self._bucketed])
            sums.append(s)
            sumsqs.append(q)
        if self._alone:  # stack and cat promote their float32 sums to float64
            sums.append(torch.stack([flats[i].sum(dtype=_sum_dtype(flats[i])) for i in self._alone]))
            sumsqs.append(torch.stack([_sumsq(flats[i]) for i in self._alone]))
        order = self._state_order
        share = self._share
        hist = self._histogram(flats, share) if share.layers else None
        return torch.cat(sums).double()[order], torch.cat(sumsqs).double()[order], hist

    def _histogram(self, flats: list[torch.Tensor], share: _HistogramShare) -> torch.Tensor:
        """Counts (layers x (bins + 2)) of the subsets of the share's layers: below lo, the bins,
        at or above hi; the other layers' rows stay 0 ("not taken in this frame"). Counted a
        group of layers at a time (`_HistogramShare`), so that the per-value temporaries (~30
        bytes a value) stay small when a share, as the first sample's, holds every layer."""
        # float32 counts whatever the layers' dtype (index_add_ wants one dtype; a subset of at
        # most 2^24 values counts exactly), so that no model's dtype can raise into its training
        counts = torch.zeros(len(flats) * (self.bins + 2), device=self._device)
        one = torch.ones((), device=self._device)
        for group in share.groups:
            values = _wide(torch.cat([self._coords.fixed(flats[i], i) for i in group.layers]))
            lo, scale, offset = group.per_value()
            bins = ((values - lo) * scale).floor_()
            bins = bins.nan_to_num_(nan=-1.0).clamp_(-1, self.bins)  # a NaN weight counts as outside
            # bin k of layer l counts at l * (bins + 2) + k + 1
            slot = bins.long().add_(offset)
            counts.index_add_(0, slot, one.expand(slot.shape))
        return counts

    # -- work: the next minibatch's gradient on the sampled update ------------------------------

    def _pick(self, rows: list[torch.Tensor | None], small: torch.Tensor | None) -> _Picked:
        """Copies of theta_t at the work coordinates `rows` (`Coordinates.draw`), the large layers'
        in their dtype: d_t = theta_{t+1} - theta_t is formed on the next step, whose optimizer
        pre-hook still sees theta_{t+1} (so that no other copy of the layer is made or kept);
        `small`: the small layers' float64 copy, made once for this and `_measure_state`."""
        values = self._held()
        large = {}
        for i, v in enumerate(values):
            if i not in self._small_pos:
                taken = self._coords.take(v, i, rows[i])
                large[i] = taken.clone() if rows[i] is None else taken
        return rows, large, small

    def _start_following(self) -> None:
        """After a sampled step: keep theta_t at its work coordinates and hook the next step."""
        self.unfollow()
        self._follow_dots = {}
        if self._theta is None:  # no optimizer step was seen: no update to attribute
            return
        self._before, self._theta = self._theta, None
        self._follow_handles.extend(self._step_pre_hooks(self._follow))
        self._clip.start()  # the clips of the step whose gradient the work takes

    @torch.no_grad()
    def _follow(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """The step after a sample: per layer this optimizer steps, w+_t = <g_{t+1}, d_t> and
        <g_{t+1}, theta_{t+1}>, both on the work coordinates (scaled to the layer at `collect`).
        d_t is formed in float32 (float64 for a float64 layer): the difference of two float32
        values within a factor 2 of each other is exact in float32, as an update's ends are."""
        if self._before is None:
            return
        rows, before, small_before = self._before
        values = self._held()
        grads = {}
        for i in self._owned(optimizer):
            if i not in self._follow_dots and (g := self.params[i].grad) is not None:
                grads[i] = g.to_local() if i in self._sharded else g  # a DTensor's gradient is one too
        for i, g in grads.items():
            if i in self._small_pos:
                continue
            taken = _wide(self._coords.take(g.detach().reshape(-1), i, rows[i]))
            weight = self._coords.weight(i)
            if weight is not None:
                taken = taken * weight
            theta = _wide(self._coords.take(values[i], i, rows[i]))
            self._follow_dots[i] = (torch.dot(taken, theta - _wide(before[i])), torch.dot(taken, theta))
        small = [i for i in grads if i in self._small_pos]
        if small:
            flat_g = _flat64([grads[i] if i in grads else torch.zeros_like(values[i]) for i in self._small])
            theta = _flat64([values[i] for i in self._small])
            plus = _segment_sum(flat_g * (theta - small_before), self._lengths)
            now = _segment_sum(flat_g * theta, self._lengths)
            for i in small:
                k = self._small_pos[i]
                self._follow_dots[i] = (plus[k], now[k])

    def _unclip(self, dots: torch.Tensor) -> torch.Tensor:
        """Work dots (rows x layers) with the loss's gradient: a clipped gradient g_c = f g read
        as g by dividing each layer's dots by the clip factor f of the step whose gradient they
        took (`clip.ClipWatch`; 1 where nothing was clipped)."""
        return dots / self._clip.factors()

    # -- collecting ----------------------------------------------------------------------------

    @torch.no_grad()
    def collect(self, step: int, loss: torch.Tensor | float | None) -> Pending:
        """Pack this step's statistics and start their copy to the host; reset for the next step."""
        sums, sumsqs, hist = self._state if self._state is not None else self._measure_state()
        # the work of the PREVIOUS sampled update, w+ (its gradient came on the step after it)
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        taken = [self._follow_dots.get(i, (zero, zero)) for i in range(len(self.params))]
        plus = torch.stack([work for work, _ in taken]) * self._scales  # stack promotes to float64
        after = torch.stack([dot for _, dot in taken]) * self._scales
        dots = self._unclip(torch.stack([after - plus, after]))
        self._start_following()
        columns = [sums, sumsqs, dots[0], dots[1]]
        if self.sites:
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
        self._first = None
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


def shares(sizes: Sequence[int], count: int) -> list[list[int]]:
    """The layers (indices into sizes) split into `count` shares of about equal total size
    (largest first, each to the lightest share so far), each share in layer order.

    A deterministic function of the layer table (full sizes, not a rank's shard), so that every
    rank of a job counts the same layers' histograms on the same sample, and the collector adds
    whole histograms."""
    load = [0] * count
    members: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = min(range(count), key=lambda k: (load[k], k))
        load[k] += sizes[i]
        members[k].append(i)
    return [sorted(m) for m in members]


#: The most values a histogram counts in one go (`Sampler._histogram`).
HISTOGRAM_GROUP = 1 << 18


class _HistogramShare:
    """One share of the layers, in groups of layers counted together (at most HISTOGRAM_GROUP
    values each, or one layer), and what counting them needs on the device, made once: a
    host-to-device copy during a step would make CUDA wait. `counted`: per layer of the table."""

    def __init__(
        self, layers: list[int], counted: list[int], table: list[LayerInfo], bins: int, device: torch.device
    ) -> None:
        self.layers = layers
        self.groups: list[_HistogramGroup] = []
        members: list[int] = []
        for i in layers:
            if members and sum(counted[j] for j in members) + counted[i] > HISTOGRAM_GROUP:
                self.groups.append(_HistogramGroup(members, counted, table, bins, device))
                members = []
            members.append(i)
        if members:
            self.groups.append(_HistogramGroup(members, counted, table, bins, device))

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)


class _HistogramGroup:
    """Layers counted together, per layer: how many values it counts, its slot offset (its row in
    the full histogram), lo and bins per unit."""

    def __init__(
        self, layers: list[int], counted: list[int], table: list[LayerInfo], bins: int, device: torch.device
    ) -> None:
        self.layers = layers
        self.total = sum(counted[i] for i in layers)
        self.counted = torch.tensor([counted[i] for i in layers], dtype=torch.long).to(device)
        self.offset = torch.tensor(layers, dtype=torch.long).to(device) * (bins + 2) + 1
        self.lo = torch.tensor([table[i].hist_lo for i in layers], device=device)
        self.scale = torch.tensor(
            [bins / (table[i].hist_hi - table[i].hist_lo) for i in layers], device=device
        )

    def per_value(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lo, bins per unit, slot offset) of each counted value, the layers end to end: made at
        each count rather than held (they would hold 16 bytes per counted value)."""
        lo, scale, offset = (
            t.repeat_interleave(self.counted, output_size=self.total)
            for t in (self.lo, self.scale, self.offset)
        )
        return lo, scale, offset

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.counted, self.offset, self.lo, self.scale))


class _FunctionalSites(TorchFunctionMode):
    """Hands the activation functions (`FUNCTIONS`) a model's forward calls to the sampler, named
    by the innermost running module; entered only inside the model's forward on a sampled step.
    (torch leaves the mode while `__torch_function__` runs: the sampler's own ops are not caught.)"""

    def __init__(self, sampler: Sampler) -> None:
        super().__init__()
        self._sampler = sampler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        running = self._sampler._running
        name = FUNCTIONS.get(func)
        if name is None or not running or running[-1] is None or not args:
            return func(*args, **kwargs)
        if not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        return self._sampler._functional(running[-1], name, func, args, kwargs)


def _force_eager() -> object | None:
    """Make compiled code run eagerly until the returned stance is exited, so that a compiled
    model's sampled step runs the site hooks without dynamo guarding on them: no recompile, and
    no hook a compiled graph would skip. None where dynamo was never imported (nothing is
    compiled; importing it would cost a second)."""
    if "torch._dynamo" not in sys.modules:
        return None
    return torch.compiler.set_stance("force_eager")


def _power_sums(t: torch.Tensor) -> torch.Tensor:
    """(sum t, sum t^2) of an activation in float32 (float64 for float64), read where it lies: no
    contiguous copy of it (a BLAS dot where it is contiguous, else a norm over its strides), and no
    float32 copy of a narrower one on an accelerator, whose reductions widen as they load. A CPU
    reduction given dtype= copies a narrower input to it first (torch 2.13), so there it is
    widened once, explicitly, rather than once per reduction."""
    if t.dtype not in (torch.float32, torch.float64):
        if t.device.type == "cpu":
            t = t.float()
        else:
            square = torch.linalg.vector_norm(t, dtype=torch.float32).square()
            return torch.stack([t.sum(dtype=torch.float32), square])
    if t.is_contiguous():
        flat = t.view(-1)
        return torch.stack([flat.sum(), torch.dot(flat, flat)])
    return torch.stack([t.sum(), torch.linalg.vector_norm(t).square()])


def _flat64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One float64 copy of many small tensors, end to end (one cat and one cast)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def _segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of these lengths (0 for an empty one)."""
    return torch.segment_reduce(values, "sum", lengths=lengths)
