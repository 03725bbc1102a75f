"""Measure a model on sampled steps, on its own device, without stalling the training loop.

The sampler owns the hooks. They are registered only for a sampled step (`arm`) and
removed right after it (`disarm`), so an unsampled step runs with no hook at all. On a
sampled step:

* the activation sites' hooks (`site_capture.SiteCapture`) add the power sums of each site's
  pre-activations and activations, and catch the activation functions a forward calls;
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
  values every time, so changes are paired, not resampled noise; `histograms`), and each
  activation site runs its engine-type scale probe;
* `collect` packs everything into one float64 tensor and starts its copy to the host
  (non-blocking from pinned memory on CUDA): the host reads it later (`pending.Pending`).

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
every rank of their device mesh must make (`layers.full_moments`). Tensor-parallel slices held as
plain tensors (`layers.TensorParallel`) are measured so too: declared as shards of their layer,
their edges sized over the group (`layers.slice_moments`).

Explicit optimizers are followed: on a sampled step a global optimizer pre-hook adopts an optimizer
that steps these parameters and is not one of them (the loop rebuilt its optimizer), logged once.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .clip import ClipWatch
from .coords import Coordinates
from .histograms import HistogramShare, shares
from .layers import (
    TensorParallel,
    describe,
    describe_shard,
    describe_slice,
    dtensor_type,
    full_moments,
    slice_moments,
)
from .pending import Pending
from .reduce import BUCKET, Buckets
from .response import response
from .site_capture import SiteCapture
from .spread import Spread
from .tensors import flat64, segment_sum, sum_dtype, sumsq, wide

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
        tensor_parallel: TensorParallel | None = None,
        replicas: int = 1,
    ) -> None:
        """`model`: whose forwards the first sampled step watches for activation functions
        (`FUNCTIONS`); each one found there becomes a site, measured from then on, and the site
        table is settled by that step's `collect` (`settled`). `fused`: the large layers' sums in
        a bounded number of device ops (`reduce.Buckets`; None: on CUDA only). `tensor_parallel`:
        which plain tensors are this rank's slices of a layer (`layers.TensorParallel`; then
        constructing the sampler is a collective over its group). `replicas`: the data-parallel
        replicas whose gradients are averaged into this rank's (DDP's), whose spread measures the
        gradient's noise (`spread.Spread`)."""
        if not layers:
            raise ValueError("the model has no parameters to watch")
        if bins < 1:
            raise ValueError(f"bins must be positive, got {bins}")
        self.params = [p for _, p in layers]  # the Parameter objects: optimizers know them by id
        dtensor = dtensor_type()
        self._sharded = (
            [] if dtensor is None else [i for i, p in enumerate(self.params) if isinstance(p, dtensor)]
        )
        sliced: dict[int, int] = {}  # tensor-parallel slices: layer -> the dimension split
        if tensor_parallel is not None:
            tensor_parallel.check(layers)
            dims = [tensor_parallel.dim(name, p) for name, p in layers]
            sliced = {i: d % self.params[i].dim() for i, d in enumerate(dims) if d is not None}
        # the layers each rank holds a part of: their histograms only on their own share
        self._parts = set(self._sharded) | set(sliced)
        values = self._read_values()
        self.bins = bins
        moments = full_moments([self.params[i] for i in self._sharded], [values[i] for i in self._sharded])
        full = dict(zip(self._sharded, moments, strict=True))
        group = None if tensor_parallel is None else tensor_parallel.group
        pieces = dict(zip(sliced, slice_moments([values[i] for i in sliced], group), strict=True))
        self.layers = [
            describe_shard(name, p, values[i], *full[i])
            if i in full
            else describe_slice(name, p, sliced[i], tensor_parallel, *pieces[i])  # type: ignore[arg-type]
            if i in pieces
            else describe(name, p)
            for i, (name, p) in enumerate(layers)
        ]
        self._capture = SiteCapture(model, sites, SHAPE_EVERY)
        self.sites = self._capture.sites  # (the same list: the first sampled step may add to it)
        self._optimizers = list(optimizers) if optimizers is not None else None
        self._foreign: weakref.WeakSet = weakref.WeakSet()  # optimizers seen stepping none of ours
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._layer_count = np.array([v.numel() for v in values], dtype=np.int64)
        self._device = values[0].device
        self._handles: list = []
        self._clip = ClipWatch(self.params, self._device)  # gradient clipping, undone in the work
        self._clip_now = ClipWatch(self.params, self._device)  # ... on the sampled step itself
        sharded = set(self._sharded)
        self._spread = Spread(self.params, [i for i in range(len(values)) if i not in sharded], replicas)
        self._rows: list[torch.Tensor | None] = []  # the coming sample's work coordinates (`arm`)
        # per layer, on the sampled step: the gradient the optimizer saw on the work coordinates
        # (float64), the optimizer and group that stepped it; or an independent gradient there
        self._grad_now: dict[int, tuple[torch.Tensor, torch.optim.Optimizer, dict]] = {}
        self._independent: dict[int, torch.Tensor] | None = None
        # the previous sampled update's same-step half of the work, per layer, and where it is known
        self._same: tuple[torch.Tensor, torch.Tensor] | None = None
        self._follow_handles: list = []
        self._before: _Picked | None = None  # theta_t on the work coordinates, until the next step
        # per layer, <g_{t+1}, d_t> and <g_{t+1}, theta_{t+1}> (the work and the dot after it)
        self._follow_dots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._small = [i for i, v in enumerate(values) if v.numel() < SMALL_NUMEL]
        self._small_pos = {i: k for k, i in enumerate(self._small)}
        # Built once, here: a host-to-device copy during a step would make CUDA wait.
        small_sizes = [values[i].numel() for i in self._small]
        self._lengths = torch.tensor(small_sizes, dtype=torch.long).to(self._device)
        self._small_index = torch.tensor(self._small, dtype=torch.long).to(self._device)
        self._large_index = torch.tensor(
            [i for i in range(len(values)) if i not in self._small_pos], dtype=torch.long
        ).to(self._device)
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
        self._first: HistogramShare | None = None  # the first sample's (`_first_share`)
        self._number = 0  # the coming sample's number in the run (`arm`)
        self._reset()

    def _histogram_share(self, layers: list[int]) -> HistogramShare:
        return HistogramShare(layers, self._counted, self.layers, self.bins, self._device)

    # -- arming ---------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, number: int = 0, closure: Callable[[], torch.Tensor] | None = None) -> None:
        """Register the hooks for the coming step, the run's sample `number` (its optimizer step
        // every, which every rank agrees on: it chooses the share of histograms and probes).
        `closure`: a loss on data independent of the coming update, whose gradient at theta_t
        (now, before the hooks) stands for the step's own in the work (`_independent_gradient`)."""
        if self._handles:
            return
        self._number = number
        if not self.settled:
            self._first = self._first_share()
        self._reset()
        self._rows = self._coords.draw()
        if closure is not None:
            self._independent = self._independent_gradient(closure)
        else:
            self._spread.arm(self._at_work)
        self._clip_now.start()
        self._handles.extend(self._capture.arm(number))
        self._handles.extend(self._step_pre_hooks(self._before_step))

    @property
    def optimizers(self) -> list[torch.optim.Optimizer] | None:
        """The optimizers measured (None: every one that steps these parameters), adopted ones in."""
        return None if self._optimizers is None else list(self._optimizers)

    def _independent_gradient(self, closure: Callable[[], torch.Tensor]) -> dict[int, torch.Tensor]:
        """The gradient of the closure's loss at theta_t on the work coordinates (float64), taken
        with `torch.autograd.grad`: the model's `.grad` and the loop's backward are untouched."""
        with torch.enable_grad():
            loss = closure()
            wanted = [i for i, p in enumerate(self.params) if p.requires_grad]
            grads = torch.autograd.grad(loss, [self.params[i] for i in wanted], allow_unused=True)
        taken = {}
        for i, g in zip(wanted, grads, strict=True):
            if g is not None:
                g = g.to_local() if i in self._sharded else g
                taken[i] = self._at_work(g.detach().reshape(-1), i).double()
        return taken

    def _step_pre_hooks(self, hook) -> list:
        """`hook` on the optimizers measured, and a global one that calls it for a measured optimizer
        it is not on: one rebuilt mid-run, adopted then (`_measured`)."""
        if self._optimizers is None:
            return [register_optimizer_step_pre_hook(hook)]
        hooked = list(self._optimizers)

        def adopting(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            if not any(optimizer is o for o in hooked) and self._measured(optimizer):
                hook(optimizer, args, kwargs)

        handles = [o.register_step_pre_hook(hook) for o in hooked]
        return [*handles, register_optimizer_step_pre_hook(adopting)]

    def _measured(self, optimizer: torch.optim.Optimizer) -> bool:
        """True if `optimizer`'s steps are measured: one of ours, or a new one stepping these
        parameters (the loop rebuilt its optimizer, whose steps the hooks on the old one would never
        see: every layer's work 0), adopted now in place of those whose parameters it took, which
        are let go (an Adam's state is twice the model), and logged once. A sampled step's check:
        a global hook, armed with the others."""
        if any(optimizer is o for o in self._optimizers):  # type: ignore[union-attr]
            return True
        if optimizer in self._foreign:
            return False
        taken = set(self._owned(optimizer))
        if not taken:
            self._foreign.add(optimizer)
            return False
        kept = [o for o in self._optimizers if taken.isdisjoint(self._owned(o))]  # type: ignore[union-attr]
        log.warning(
            "thermoscope: a new %s steps %d of the model's %d parameter tensors: measured from now on, "
            "in place of the %d optimizer(s) given before it",
            type(optimizer).__name__,
            len(taken),
            len(self.params),
            len(self._optimizers) - len(kept),  # type: ignore[arg-type]
        )
        self._optimizers = [*kept, optimizer]
        return True

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
        self._capture.disarm()
        self._spread.disarm()
        self._clip_now.stop()

    @property
    def settled(self) -> bool:
        """True once the site table can grow no more (after the first sampled step's `collect`)."""
        return self._capture.settled

    def _reset(self) -> None:
        self._values: list[torch.Tensor] | None = None
        self._state: _State | None = None
        self._theta: _Picked | None = None  # theta_t at the work coordinates
        self._grad_now = {}
        self._independent = None
        self._capture.reset()

    # -- parameters ---------------------------------------------------------------------------

    def _read_values(self) -> list[torch.Tensor]:
        """Each layer's values on this rank: the parameter, or the local shard of a DTensor."""
        if not self._sharded:
            return self.params
        values = list(self.params)
        for i in self._sharded:
            values[i] = values[i].to_local()
        return values

    def _at_work(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Layer i's values where the same-step work reads it, as theta_t was kept: a small layer
        whole (however large the `subset`), a large one at the sample's work coordinates."""
        if i in self._small_pos or not self._rows:
            return flat
        return self._coords.take(flat, i, self._rows[i])

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
            small = flat64([self._held()[i] for i in self._small]) if self._small else None
            self._state = self._measure_state(small)
            self._theta = self._pick(self._rows, small)
        for group in optimizer.param_groups:  # the gradient this optimizer steps on, per layer
            for p in group["params"]:
                i = self._index.get(id(p))
                if i is not None and i not in self._grad_now and p.grad is not None:
                    g = p.grad.to_local() if i in self._sharded else p.grad
                    taken = self._at_work(g.detach().reshape(-1), i)
                    self._grad_now[i] = (taken.double(), optimizer, group)

    def held_bytes(self) -> int:
        """Bytes of tensors the sampler keeps between steps: the blocks and the shares' indices, the
        small layers' sizes, and theta_t on a sample's work coordinates until the next step."""
        kept = [self._lengths, self._scales, self._small_index, self._large_index]
        if self._before is not None:
            rows, large, small = self._before
            kept += (
                [t for t in rows if t is not None] + list(large.values()) + ([] if small is None else [small])
            )
        held = sum(t.numel() * t.element_size() for t in kept) + self._coords.nbytes()
        return held + sum(s.nbytes() for s in self._shares)

    @property
    def _share(self) -> HistogramShare:
        """The layers this sample counts histograms of: share number % SHAPE_EVERY of `_shares`,
        chosen by the run's sample number, not this process's count, so that a worker restarted
        mid-run counts the same layers as the other ranks at each step; more on its first sample
        (`_first_share`)."""
        if not self.settled and self._first is not None:
            return self._first
        return self._shares[self._number % SHAPE_EVERY]

    def _first_share(self) -> HistogramShare:
        """The first sample's layers: every layer held whole, so that the first reading has their
        shapes (a rank counting a whole layer the others do not count adds a whole histogram or
        none: the collector takes one rank's row of it), but a sharded layer (a DTensor's shard, a
        tensor-parallel slice) only on its own share, since a shard's histogram alone, merged,
        would read as the layer's."""
        share = set(self._shares[self._number % SHAPE_EVERY].layers)
        return self._histogram_share(
            [i for i in range(len(self.layers)) if i not in self._parts or i in share]
        )

    @property
    def shape_sample(self) -> bool:
        """Whether this sample counts any histogram (its share of the layers is not empty)."""
        return bool(self._share.layers)

    def _measure_state(self, small: torch.Tensor | None = None) -> _State:
        """(sum, sum of squares, histogram or None) of every layer: small tensors together from
        one flat copy (`small`, when the caller made it already), large ones together in buckets
        where fused (`reduce.Buckets`), else one at a time; histograms from the layers' subsets."""
        flats = self._held()
        sums: list[torch.Tensor] = []  # the groups' results end to end, in `_state_order`'s order
        sumsqs: list[torch.Tensor] = []
        if self._small:
            flat = flat64([flats[i] for i in self._small]) if small is None else small
            sums.append(segment_sum(flat, self._lengths))
            sumsqs.append(segment_sum(flat * flat, self._lengths))
        if self._buckets is not None:
            s, q = self._buckets.moments([flats[i] for i in self._bucketed])
            sums.append(s)
            sumsqs.append(q)
        if self._alone:  # stack and cat promote their float32 sums to float64
            sums.append(torch.stack([flats[i].sum(dtype=sum_dtype(flats[i])) for i in self._alone]))
            sumsqs.append(torch.stack([sumsq(flats[i]) for i in self._alone]))
        order = self._state_order
        share = self._share
        hist = self._histogram(flats, share) if share.layers else None
        return torch.cat(sums).double()[order], torch.cat(sumsqs).double()[order], hist

    def _histogram(self, flats: list[torch.Tensor], share: HistogramShare) -> torch.Tensor:
        """Counts (layers x (bins + 2)) of the subsets of the share's layers: below lo, the bins,
        at or above hi; the other layers' rows stay 0 ("not taken in this frame"). Counted a
        group of layers at a time (`HistogramShare`), so that the per-value temporaries (~30
        bytes a value) stay small when a share, as the first sample's, holds every layer."""
        # float32 counts whatever the layers' dtype (index_add_ wants one dtype; a subset of at
        # most 2^24 values counts exactly), so that no model's dtype can raise into its training
        counts = torch.zeros(len(flats) * (self.bins + 2), device=self._device)
        one = torch.ones((), device=self._device)
        for group in share.groups:
            values = wide(torch.cat([self._coords.fixed(flats[i], i) for i in group.layers]))
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
            taken = wide(self._coords.take(g.detach().reshape(-1), i, rows[i]))
            weight = self._coords.weight(i)
            if weight is not None:
                taken = taken * weight
            theta = wide(self._coords.take(values[i], i, rows[i]))
            self._follow_dots[i] = (torch.dot(taken, theta - wide(before[i])), torch.dot(taken, theta))
        small = [i for i in grads if i in self._small_pos]
        if small:
            flat_g = flat64([grads[i] if i in grads else torch.zeros_like(values[i]) for i in self._small])
            theta = flat64([values[i] for i in self._small])
            plus = segment_sum(flat_g * (theta - small_before), self._lengths)
            now = segment_sum(flat_g * theta, self._lengths)
            for i in small:
                k = self._small_pos[i]
                self._follow_dots[i] = (plus[k], now[k])

    def _theta_at(self, picked: _Picked, i: int) -> torch.Tensor:
        """Layer i's theta_t on its work coordinates, from what `_pick` kept."""
        _, large, small = picked
        if i not in self._small_pos:
            return large[i]
        start = sum(self.params[j].numel() for j in self._small[: self._small_pos[i]])
        return small[start : start + self.params[i].numel()]  # type: ignore[index]

    def _update_sq(self) -> torch.Tensor:
        """Per layer, sum (theta_{t+1} - theta_t)^2 of the step just made: what the findings weigh a
        layer's update against its weights with (a frozen layer's 0, an exploding update's jump).
        Read where theta_t was kept for the work (`_pick`), so it costs a subtraction and a dot: the
        small layers exact (their float64 copy), a large one on its work blocks scaled to the layer
        as the work is (n/k, or `weight` where it has a tail: unbiased). 0 where no optimizer step
        was seen (the pre-hook keeps theta_t): nothing measured moved the values."""
        sq = torch.zeros(len(self.params), dtype=torch.float64, device=self._device)
        if self._theta is None:
            return sq
        rows, large, small = self._theta
        values = self._held()
        if small is not None:
            d = flat64([values[i] for i in self._small]) - small
            sq.index_copy_(0, self._small_index, segment_sum(d * d, self._lengths))
        dots = []
        for i, before in large.items():  # the large layers, in order (`_pick`)
            d = (wide(self._coords.take(values[i], i, rows[i])) - wide(before)).double()
            weight = self._coords.weight(i)
            dots.append(torch.dot(d if weight is None else d * weight, d))
        if dots:
            sq.index_copy_(0, self._large_index, torch.stack(dots))
        return sq * self._scales

    def _same_step(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per layer, the same-step half of the work of the update just made, and where it is
        known: <g'_t, d_t> with the closure's independent gradient g'_t, else the same-batch work
        <g_t, d_t> less its noise correlation sum_i J_ii Var(g_i) (`response`, `spread`), unknown
        where either is (one rank, one backward, no closure: the work is w+ alone), divided by the
        step's clip factor (`clip.ClipWatch`: the
        clipped gradient and the noise read in its units, the update in the loss's)."""
        if self._theta is None:
            return None
        values = self._held()
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        same = [zero] * len(self.params)
        known = [False] * len(self.params)
        factors = self._clip_now.factors()
        unscale = None
        if self._independent is None:
            unscale = self._spread.unscale({i: seen[0] / factors[i] for i, seen in self._grad_now.items()})
        for i in range(len(self.params)):
            if i in self._sharded:  # a shard's update is read where its optimizer holds it: w+ alone
                continue
            if self._independent is not None:
                g, seen = self._independent.get(i), None
            else:
                seen = self._grad_now.get(i)
                g = None if seen is None else seen[0]
            if g is None:
                continue
            d = self._at_work(values[i], i).double() - self._theta_at(self._theta, i).double()
            weight = None if i in self._small_pos else self._coords.weight(i)
            if weight is not None:
                d = d * weight
            work = torch.dot(g, d)
            if seen is not None:
                _, optimizer, group = seen
                p = self.params[i]
                jac = response(
                    optimizer,
                    group,
                    p,
                    g,
                    lambda flat, i=i: self._at_work(flat, i).double(),
                )
                var = None if unscale is None else self._spread.variance(i, g, unscale * factors[i])
                if jac is None or var is None:  # no correction to be had: w+ alone (`_work`)
                    continue
                weighted = jac if weight is None else jac * weight
                work = (work - (var * weighted).sum()) / factors[i]
            same[i], known[i] = work, True
        return torch.stack(same) * self._scales, torch.tensor(known, device=self._device)

    def _work(self, plus: torch.Tensor, followed: torch.Tensor) -> torch.Tensor:
        """Per layer, the work of the previous sampled update: the trapezoid 1/2 (w+ + the same-step
        half) where both are known, else w+ alone. w+ reads the next step's gradient, clipped by
        that step's factor: divided back (`clip.ClipWatch`; 1 where nothing was clipped)."""
        plus = plus / self._clip.factors()
        if self._same is None:
            return plus
        same, known = self._same
        return torch.where(known & followed, (plus + same) / 2, plus)

    # -- collecting ----------------------------------------------------------------------------

    def discard(self) -> None:
        """Drop this sampled step (the loop's order or a skipped step makes it no step's): its
        measurements, its hooks, and the work of the previous sample that it would have carried
        (taken on the step after that sample, which this one does not follow as the loop meant)."""
        self.disarm()
        self.unfollow()
        self._follow_dots = {}
        self._reset()

    @torch.no_grad()
    def collect(self, step: int, loss: torch.Tensor | float | None) -> Pending:
        """Pack this step's statistics and start their copy to the host; reset for the next step."""
        sums, sumsqs, hist = self._state if self._state is not None else self._measure_state()
        # the work of the PREVIOUS sampled update, w+ (its gradient came on the step after it)
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        taken = [self._follow_dots.get(i, (zero, zero)) for i in range(len(self.params))]
        plus = torch.stack([work for work, _ in taken]) * self._scales  # stack promotes to float64
        after = torch.stack([dot for _, dot in taken]) * self._scales / self._clip.factors()
        followed = torch.tensor(
            [i in self._follow_dots for i in range(len(self.params))], device=self._device
        )
        work = self._work(plus, followed)
        update_sq = self._update_sq()
        self._same = self._same_step()
        self._clip_now.stop()
        self._start_following()
        # on the wire, <g_{t+1}, theta_{t+1}> and that less the work: their difference is the work
        columns = [sums, sumsqs, after - work, after, update_sq]
        if self.sites:
            columns.extend(self._capture.columns(self._device))
        if hist is not None:
            columns.append(hist)
        energy: float | None = math.nan if loss is None else None
        if isinstance(loss, torch.Tensor):
            columns.append(loss.detach().reshape(-1)[:1].to(device=self._device, dtype=torch.float64))
        elif loss is not None:
            energy = float(loss)
        packed = torch.cat([c.reshape(-1) for c in columns]).double()
        site_count, has_histogram = self._capture.count, hist is not None
        self._reset()
        self._capture.settle()
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
