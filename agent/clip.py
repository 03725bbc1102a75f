"""Undo gradient clipping in the work: the work is taken with the loss's gradient, not the clipped one.

The first-order change of the loss over an update is <grad L, Delta theta> with the gradient of
the loss (docs/science.md section 2). The sampler reads the gradient at the optimizer's step
pre-hook, where a clipped gradient is all there is: with `clip_grad_norm_` at factor c the work
reads c times too little (0.81x on GPT-2 at max_norm 1.0, 0.12x at 0.1, before this module).
A clip is told apart from what else changes a gradient between backward and the step (above
all `GradScaler.unscale_`, whose unscaled gradient IS the loss's gradient) by watching the
clipping functions themselves: `torch.nn.utils.clip_grad_norm_`, `clip_grads_with_norm_` and
`clip_grad_value_` (what training loops, Hugging Face's Trainer and accelerate call; both
`torch.nn.utils` and `torch.nn.utils.clip_grad` spellings). While a `ClipWatch` is started
(the step whose gradient the work uses) each call records, per watched parameter tensor, the
factor f with which the clipped gradient g_c stands for the gradient g:

* a norm clip scales every gradient by one factor: f = |g_c| / |g| per tensor, exact;
* a value clip clamps elementwise: f = <g_c, g_c> / <g, g_c>, computed before the call from
  clamp(g), so that <g_c, Delta theta> / f = <g, Delta theta> exactly when the update is
  proportional to g_c (SGD) and to first order otherwise.

Several clips of one tensor in a step multiply. The sampler divides each layer's work dots by its
factor (`factors`). Nothing leaves the device: the factors are 0-d device tensors. A function
bound before the patches (`from torch.nn.utils import clip_grad_norm_` at import time, before a
Monitor exists) and clipping done inside a framework's own code (FSDP1's `clip_grad_norm_`
method, DeepSpeed) are not seen: their work reads the clipped gradient. The patches are
installed with the first watch and stay; while no watch is started they return at once.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

#: The watches started now: a weak set, so that a sampler dropped without stopping stops watching.
_started: weakref.WeakSet[ClipWatch] = weakref.WeakSet()
_install_lock = threading.Lock()
_installed = False


class ClipWatch:
    """The clip factors of one model's parameter tensors between `start` and `stop`."""

    def __init__(self, params: Sequence[torch.Tensor], device: torch.device) -> None:
        _install()
        self._index = {id(p): i for i, p in enumerate(params)}
        self._n = len(params)
        self._device = device
        self._factor: dict[int, torch.Tensor] = {}

    def start(self) -> None:
        """Record the clips from now on (forgetting those recorded before)."""
        self._factor = {}
        _started.add(self)

    def stop(self) -> None:
        """Stop recording; the factors recorded stay readable until the next `start`."""
        _started.discard(self)

    def factors(self) -> torch.Tensor:
        """(layers,) float64 on the device: each tensor's clip factor since `start`, 1 if unclipped."""
        one = torch.ones((), dtype=torch.float64, device=self._device)
        return torch.stack([self._factor.get(i, one).to(self._device) for i in range(self._n)])

    def _note(self, params: list[torch.Tensor], factors: list[torch.Tensor]) -> None:
        for p, f in zip(params, factors, strict=True):
            i = self._index.get(id(p))
            if i is not None:
                self._factor[i] = self._factor[i] * f if i in self._factor else f


def _watched(parameters: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(all parameters as a list, those a started watch knows that have a gradient)."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    known = [w._index for w in list(_started)]
    return params, [p for p in params if p.grad is not None and any(id(p) in k for k in known)]


def _local(g: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a clip scales every shard alike), else the tensor; flat."""
    return (g.to_local() if hasattr(g, "to_local") else g).detach().reshape(-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> in float64 (float32 products for lower precisions, as the work's own dots)."""
    wide = torch.float64 if a.dtype == torch.float64 else torch.float32
    return torch.dot(a.to(wide), b.to(wide)).double()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where both are positive, else 1 (nothing to undo, or nothing that can be)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, num / torch.where(ok, den, 1.0), 1.0)


def _notify(params: list[torch.Tensor], factors: list[torch.Tensor]) -> None:
    for watch in list(_started):
        watch._note(params, factors)


def _norm_clip(original: Callable) -> Callable:
    """Wrap a clip that scales all gradients by one factor (clip_grad_norm_, clip_grads_with_norm_)."""

    @functools.wraps(original)
    @torch.no_grad()
    def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        if not _started:
            return original(parameters, *args, **kwargs)
        params, watched = _watched(parameters)
        grads = [_local(p.grad) for p in watched]
        before = [_dot(g, g) for g in grads]
        result = original(params, *args, **kwargs)
        after = [_dot(g, g) for g in (_local(p.grad) for p in watched)]
        _notify(watched, [_ratio(a, b).sqrt() for a, b in zip(after, before, strict=True)])
        return result

    return clip


def _value_clip(original: Callable) -> Callable:
    """Wrap clip_grad_value_(parameters, clip_value, foreach=None)."""

    @functools.wraps(original)
    @torch.no_grad()
    def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        if not _started:
            return original(parameters, *args, **kwargs)
        params, watched = _watched(parameters)
        value = float(args[0] if args else kwargs["clip_value"])
        factors = []
        for p in watched:
            g = _local(p.grad)
            clipped = g.clamp(-value, value)
            factors.append(_ratio(_dot(clipped, clipped), _dot(g, clipped)))
        result = original(params, *args, **kwargs)
        _notify(watched, factors)
        return result

    return clip


def _install() -> None:
    """Patch the clipping functions, once per process, in both modules that export them."""
    global _installed
    with _install_lock:
        if _installed:
            return
        utils, module = torch.nn.utils, torch.nn.utils.clip_grad
        norm, value = _norm_clip(module.clip_grad_norm_), _value_clip(module.clip_grad_value_)
        module.clip_grad_norm_ = utils.clip_grad_norm_ = norm
        module.clip_grad_value_ = utils.clip_grad_value_ = value
        # the public alias only: clip_grad_norm_ calls the private function, which stays as it is
        utils.clip_grads_with_norm_ = _norm_clip(utils.clip_grads_with_norm_)
        _installed = True
