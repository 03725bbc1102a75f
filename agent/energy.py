"""What a sampled step backpropagated and stepped: its energy, and whether the loop's order holds.

Zero-code instrumentation (`raytrain.setup`) and a `Monitor` stepped without a loss see no
loss, yet the energy must be the loss (docs/science.md section 2): the cumulative work that
would stand in for it drifts with its estimator's bias, and phases read from a drifting energy
never settle. A `LossCapture`, armed for a sampled step only, notes every top-level
`torch.autograd.backward` call (which `Tensor.backward` makes too) and every optimizer step
until the step is collected:

* a scalar with no explicit gradient is a loss; the step's energy is the *sum* of them since
  the last optimizer step: the optimizer steps on the gradient of that sum, so it is the energy
  whose change the work accounts for. `(loss / k).backward()` per micro-batch reads the mean
  loss; two terms backpropagated separately read their sum; `loss.backward()` k times undivided
  reads k times the mean loss (the gradient stepped on is k times the mean's too);
* a scalar that `GradScaler.scale` returned is divided by the scale it was multiplied with, at
  its backward, so that `GradScaler.update` changing the scale in place afterwards cannot reach it
  (the scale is a power of two: the division is exact);
* a step `GradScaler.step` skipped (inf/NaN gradients: the optimizer's step, and its hooks,
  never ran) is not a step: the scalars noted before it are dropped, not added to the next
  step's energy, and `skipped` says so until an optimizer step comes;
* anything else (a non-scalar, an explicit gradient, several tensors, a tensor subclass such as a
  DTensor) is not a loss: the step has none (`take` returns None) and the energy falls back to the
  cumulative work for that sample (`Reading.energy_from_work`). So does a step that called no
  backward (`torch.autograd.grad`, gradients set by hand).

The same notes tell a loop that calls `Monitor.step` out of order (`misordered`): a backward
after the last optimizer step means `step` came before `optimizer.step()`; a loss handed over that
no backward since the last sampled step reached means `step(loss)` came before its
`backward()`. A loop that hands its loss over still has the capture armed on sampled steps, for
the order alone: it notes each backward's graph root and sums nothing.

Nothing is read on the host: the values are detached device tensors, summed on the device; the
sampler's packing copies the sum with the rest of the sample. Backward calls made during a
backward (reentrant checkpointing) are not the loss and are skipped. The patches of
`torch.autograd.backward`, `GradScaler.scale` and `GradScaler.step` are installed with the first
capture and stay; while no capture is armed they return at once (tests/bench/bench_loss_capture.py
measures it). The global optimizer step pre-hook that notes steps is registered only while a
capture is armed. A capture sees the backwards and optimizer steps of the thread that armed it
(the training loop's): two monitors training on two threads each see their own loop; two
monitors armed on one thread (two models trained in one loop) each see both losses, summed.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

#: The captures armed now: a weak set, so that a monitor dropped without `close` stops capturing.
#: The wrappers test `_armed.data` (its set of weak references, which dead ones leave at once):
#: 0.1 us against 0.5 us for the WeakSet's own length.
_armed: weakref.WeakSet[LossCapture] = weakref.WeakSet()
_install_lock = threading.Lock()
_installed = False
#: The most graph roots a sampled step keeps for the order check (a loop backpropagates a few).
MAX_ROOTS = 64
#: How far below a backpropagated root a loss handed to `Monitor.step` may sit, and the most
#: graph nodes looked at to find it.
REACH_DEPTH = 4
REACH_NODES = 256
#: The global optimizer step pre-hook (`_step_begins`), registered while a capture is armed.
_step_hook: RemovableHandle | None = None


class LossCapture:
    """The losses backpropagated and the optimizer steps between `arm` and `take` (see the module
    docstring)."""

    def __init__(self) -> None:
        _install()
        self._sum: torch.Tensor | None = None
        self._unusable = False
        self._values = True  # whether the scalars are summed (not when the loop hands its loss over)
        self._scaled: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
        self._roots: list[Any] = []  # the graph roots backpropagated (their `grad_fn`s)
        self._pending = False  # a backward came after the last optimizer step (outside a closure)
        self._closure = False  # the last optimizer step ran a closure: its backwards are its own
        self._stepped = 0  # optimizer steps since `arm`
        self._skipped = False  # GradScaler skipped a step, and no optimizer step came after it
        self._thread = threading.get_ident()  # the training thread: the one that armed it

    @property
    def armed(self) -> bool:
        return self in _armed

    def arm(self, values: bool = True) -> None:
        """Start noting backward calls and optimizer steps (forgetting anything noted before);
        `values`: sum the losses (False: note the order only)."""
        self._clear()
        self._values, self._stepped, self._closure = values, 0, False
        self._thread = threading.get_ident()
        _armed.add(self)
        _watch_steps(True)

    def disarm(self) -> None:
        _armed.discard(self)
        self._roots.clear()
        _watch_steps(bool(_armed.data))

    @property
    def skipped(self) -> bool:
        """True when `GradScaler.step` skipped a step since `arm` and no optimizer step came after."""
        return self._skipped

    def misordered(self, loss: Any) -> str | None:
        """What the loop did out of order if `Monitor.step(loss)` is called now, or None: a backward
        after the last optimizer step, or a loss with a graph no backward since `arm` reached."""
        if self._pending:
            return "before optimizer.step(): a backward() came after the last optimizer step"
        node = getattr(loss, "grad_fn", None)
        if node is not None and self._roots and not _reaches(self._roots, node):
            return "before loss.backward(): no backward() since the last sampled step reached the loss given"
        return None

    def take(self) -> torch.Tensor | None:
        """The sum of the losses backpropagated since the last optimizer step before now (a 0-d
        float64 device tensor), or None if no loss was seen or a backward was not a loss; disarms."""
        self.disarm()
        total = None if self._unusable else self._sum
        self._clear()
        return total

    def _clear(self) -> None:
        self._sum, self._unusable, self._pending, self._skipped = None, False, False, False
        self._scaled.clear()
        self._roots.clear()

    def _backward(self, tensors: Any, grad_tensors: Any) -> None:
        if not self._closure:
            self._pending = True
        if len(self._roots) < MAX_ROOTS:
            self._roots.extend(
                t.grad_fn
                for t in (tensors if isinstance(tensors, list | tuple) else [tensors])
                if isinstance(t, torch.Tensor) and t.grad_fn is not None
            )
        if not self._values:
            return
        loss = _scalar(tensors, grad_tensors)
        if loss is None:
            self._unusable = True
            return
        value = loss.detach().to(torch.float64)
        scaled = self._scaled.get(id(loss))
        if scaled is not None and scaled[0]() is loss:
            value = value / scaled[1].to(device=value.device, non_blocking=True)
        self._sum = value if self._sum is None else self._sum + value.to(self._sum.device)

    def _step(self, closure: bool) -> None:
        """An optimizer step begins: the losses so far are what it steps on."""
        self._stepped += 1
        self._pending, self._skipped, self._closure = False, False, closure

    def _skip(self) -> None:
        """`GradScaler.step` found inf/NaN and did not step: what was noted before is no step's."""
        self._clear()
        self._skipped = True

    def _note_scaled(self, outputs: Any, scale: torch.Tensor) -> None:
        """Remember the tensors `GradScaler.scale` returned, with the scale they carry."""
        if isinstance(outputs, torch.Tensor):
            self._scaled = {k: v for k, v in self._scaled.items() if v[0]() is not None}
            self._scaled[id(outputs)] = (weakref.ref(outputs), scale)
        elif isinstance(outputs, list | tuple):
            for t in outputs:
                self._note_scaled(t, scale)


def _reaches(roots: list[Any], node: Any) -> bool:
    """Whether `node` is one of the graph `roots` or within REACH_DEPTH steps below one of them
    (`(loss / k).backward()`, `scaler.scale(loss).backward()`, a sum of terms); at most
    REACH_NODES nodes are visited, so a wide graph costs a bounded walk."""
    frontier, seen = list(roots), 0
    for _ in range(REACH_DEPTH + 1):
        if any(n is node for n in frontier):
            return True
        seen += len(frontier)
        if seen > REACH_NODES:
            return True  # not proven out of order: believe the loop
        frontier = [child for n in frontier for child, _ in n.next_functions if child is not None]
    return False


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


def _here() -> list[LossCapture]:
    """The captures armed by this thread: a process that trains two models on two threads, each
    with its monitor, has each see its own loop's backwards and steps only."""
    thread = threading.get_ident()
    return [capture for capture in list(_armed) if capture._thread == thread]


def _watch_steps(on: bool) -> None:
    """Register the global optimizer step pre-hook while some capture is armed, and only then, so
    that an unsampled step runs no hook of ours. (A capture armed from a global post-hook, as the
    zero-code agent's step is counted, adds to the pre-hooks: not the dictionary torch iterates.)"""
    global _step_hook
    with _install_lock:
        if on and _step_hook is None:
            _step_hook = register_optimizer_step_pre_hook(_step_begins)
        elif not on and _step_hook is not None:
            _step_hook.remove()
            _step_hook = None


def _install() -> None:
    """Wrap `torch.autograd.backward`, `GradScaler.scale` and `GradScaler.step`, once per process."""
    global _installed
    with _install_lock:
        if not _installed:
            torch.autograd.backward = _noting_backward(torch.autograd.backward)
            torch.amp.GradScaler.scale = _noting_scale(torch.amp.GradScaler.scale)  # type: ignore[method-assign]
            torch.amp.GradScaler.step = _noting_step(torch.amp.GradScaler.step)  # type: ignore[method-assign]
            _installed = True


def _noting_backward(backward: Callable[..., None]) -> Callable[..., None]:
    """`backward`, telling the armed captures first (returns at once when none is armed)."""

    @functools.wraps(backward)
    def noting_backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> None:
        if _armed.data and torch._C._current_graph_task_id() == -1:  # not from inside a backward
            for capture in _here():
                capture._backward(tensors, kwargs.get("grad_variables", grad_tensors))
        return backward(tensors, grad_tensors, *args, **kwargs)

    return noting_backward


def _noting_scale(scale: Callable[..., Any]) -> Callable[..., Any]:
    """`GradScaler.scale`, telling the armed captures which tensors carry which scale."""

    @functools.wraps(scale)
    def noting_scale(self: torch.amp.GradScaler, outputs: Any) -> Any:
        scaled = scale(self, outputs)
        if _armed.data and self.is_enabled() and self._scale is not None:
            for capture in _here():
                capture._note_scaled(scaled, self._scale)
        return scaled

    return noting_scale


def _noting_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """`GradScaler.step`, telling the armed captures when it skipped the optimizer's step."""

    @functools.wraps(step)
    def noting_step(
        self: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any
    ) -> Any:
        if not _armed.data:
            return step(self, optimizer, *args, **kwargs)
        captures = [(capture, capture._stepped) for capture in _here()]
        result = step(self, optimizer, *args, **kwargs)
        for capture, stepped in captures:
            if capture._stepped == stepped:  # no optimizer step ran: inf/NaN found
                capture._skip()
        return result

    return noting_step


def _step_begins(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """The global optimizer step pre-hook: an optimizer step begins (returns at once when no
    capture is armed). A step given a closure runs its own forward and backward."""
    if _armed.data:
        closure = any(a is not None for a in args[1:]) or kwargs.get("closure") is not None  # args[0]: self
        for capture in _here():
            capture._step(closure)
