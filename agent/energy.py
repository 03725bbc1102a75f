"""The loss of a step the training loop does not hand over: the scalar `backward()` is called on.

Zero-code instrumentation (`raytrain.setup`) and a `Monitor` stepped without a loss see no
loss, yet the energy must be the loss (docs/science.md section 2): the cumulative work that
would stand in for it drifts with its estimator's bias, and phases read from a drifting energy
never settle. A `LossCapture`, armed for a sampled step
only, notes every top-level `torch.autograd.backward` call (which `Tensor.backward` makes too)
until the step is collected:

* a scalar with no explicit gradient is a loss; the step's energy is the mean of them (one per
  micro-batch under gradient accumulation). A loss divided by the accumulation count before its
  backward (`(loss / k).backward()`) reads divided by k: what was backpropagated is what is seen;
* a scalar that `GradScaler.scale` returned is divided by the scale it was multiplied with, at
  its backward, so that `GradScaler.update` changing the scale in place afterwards cannot reach it
  (the scale is a power of two: the division is exact);
* anything else (a non-scalar, an explicit gradient, several tensors, a tensor subclass such as a
  DTensor) is not a loss: the step has none (`take` returns None) and the energy falls back to the
  cumulative work for that sample (`Reading.energy_from_work`). So does a step that called no
  backward (`torch.autograd.grad`, gradients set by hand).

Nothing is read on the host: the values are detached device tensors, summed on the device; the
sampler's packing copies the mean with the rest of the sample. Backward calls made during a
backward (reentrant checkpointing) are not the loss and are skipped. The patches of
`torch.autograd.backward` and `GradScaler.scale` are installed with the first capture and stay;
while no capture is armed they return at once (tests/bench/bench_loss_capture.py measures it).
Every armed capture of the process sees every backward: a process that trains two models with
two monitors at once gives each the mean of both losses.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

#: The captures armed now: a weak set, so that a monitor dropped without `close` stops capturing.
#: The wrappers test `_armed.data` (its set of weak references, which dead ones leave at once):
#: 0.1 us against 0.5 us for the WeakSet's own length.
_armed: weakref.WeakSet[LossCapture] = weakref.WeakSet()
_install_lock = threading.Lock()
_installed = False


class LossCapture:
    """The losses backpropagated between `arm` and `take` (see the module docstring)."""

    def __init__(self) -> None:
        _install()
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._unusable = False
        self._scaled: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    @property
    def armed(self) -> bool:
        return self in _armed

    def arm(self) -> None:
        """Start noting backward calls (forgetting anything noted before)."""
        self._sum, self._count, self._unusable = None, 0, False
        self._scaled.clear()
        _armed.add(self)

    def disarm(self) -> None:
        _armed.discard(self)

    def take(self) -> torch.Tensor | None:
        """The mean loss backpropagated since `arm` (a 0-d float64 device tensor), or None if no
        loss was seen or a backward was not a loss; disarms."""
        self.disarm()
        mean = None if self._unusable or self._sum is None else self._sum / self._count
        self._sum, self._count = None, 0
        self._scaled.clear()
        return mean

    def _backward(self, tensors: Any, grad_tensors: Any) -> None:
        loss = _scalar(tensors, grad_tensors)
        if loss is None:
            self._unusable = True
            return
        value = loss.detach().to(torch.float64)
        scaled = self._scaled.get(id(loss))
        if scaled is not None and scaled[0]() is loss:
            value = value / scaled[1].to(device=value.device, non_blocking=True)
        self._sum = value if self._sum is None else self._sum + value.to(self._sum.device)
        self._count += 1

    def _note_scaled(self, outputs: Any, scale: torch.Tensor) -> None:
        """Remember the tensors `GradScaler.scale` returned, with the scale they carry."""
        if isinstance(outputs, torch.Tensor):
            self._scaled = {k: v for k, v in self._scaled.items() if v[0]() is not None}
            self._scaled[id(outputs)] = (weakref.ref(outputs), scale)
        elif isinstance(outputs, list | tuple):
            for t in outputs:
                self._note_scaled(t, scale)


def _scalar(tensors: Any, grad_tensors: Any) -> torch.Tensor | None:
    """The loss of a backward call: one one-value tensor with an implicit gradient, else None.

    Only a plain tensor: a subclass (a DTensor loss under tensor parallelism) would not pack with
    the sample's plain tensors, and its local value may be a partial sum."""
    if isinstance(tensors, list | tuple) and len(tensors) == 1:
        tensors = tensors[0]
    if isinstance(grad_tensors, list | tuple) and len(grad_tensors) == 1:
        grad_tensors = grad_tensors[0]
    if type(tensors) is torch.Tensor and grad_tensors is None and tensors.numel() == 1:
        return tensors
    return None


def _install() -> None:
    """Wrap `torch.autograd.backward` and `GradScaler.scale`, once per process."""
    global _installed
    with _install_lock:
        if not _installed:
            torch.autograd.backward = _noting_backward(torch.autograd.backward)
            torch.amp.GradScaler.scale = _noting_scale(torch.amp.GradScaler.scale)  # type: ignore[method-assign]
            _installed = True


def _noting_backward(backward: Callable[..., None]) -> Callable[..., None]:
    """`backward`, telling the armed captures first (returns at once when none is armed)."""

    @functools.wraps(backward)
    def noting_backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> None:
        if _armed.data and torch._C._current_graph_task_id() == -1:  # not from inside a backward
            for capture in list(_armed):
                capture._backward(tensors, kwargs.get("grad_variables", grad_tensors))
        return backward(tensors, grad_tensors, *args, **kwargs)

    return noting_backward


def _noting_scale(scale: Callable[..., Any]) -> Callable[..., Any]:
    """`GradScaler.scale`, telling the armed captures which tensors carry which scale."""

    @functools.wraps(scale)
    def noting_scale(self: torch.amp.GradScaler, outputs: Any) -> Any:
        scaled = scale(self, outputs)
        if _armed.data and self.is_enabled() and self._scale is not None:
            for capture in list(_armed):
                capture._note_scaled(scaled, self._scale)
        return scaled

    return noting_scale
