"""Thermoscope in a Lightning `Trainer`: one callback.

    trainer = lightning.Trainer(max_steps=1000, callbacks=[ThermoscopeCallback()])

At train start it watches the LightningModule and every optimizer its `configure_optimizers` made
(`thermoscope.agent.watch`: the collector from $THERMOSCOPE_COLLECTOR or the Ray actor, dormant
until there is one), named with the trainer's global rank, world size and local rank; the job and
the run are the launcher's (`identity`) unless `job=`/`run=` are given. After each training batch in
which an optimizer stepped (`on_train_batch_end`, so after the real step, under gradient
accumulation too) the monitor's step is counted; at train end it flushes and closes.

The loss: the mean of the losses `training_step` returned over the batches of the optimizer step
(Lightning's automatic optimization divides each by `accumulate_grad_batches` before its backward;
that is undone). Under manual optimization a `training_step` that returns its loss (a tensor, or a
dict with "loss") hands it over the same way; one that returns nothing leaves the monitor to capture
the scalar `backward()` is called on (`energy.LossCapture`).

The closure: automatic optimization calls `optimizer.step(closure)`, and the closure runs the
forward and backward passes inside the step, after the optimizer's step pre-hooks, where the
sampler reads the step's gradient. So the callback adds its own pre-hook, first, that runs the
closure and hands the step its result: the gradient is there when the sampler reads it, and the
optimizer's update is the same. An optimizer that evaluates its closure more than once (LBFGS) is
left as it is (its gradient is read one evaluation late), and the callback says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning
import torch
from torch.utils.hooks import RemovableHandle

from thermoscope.agent.monitor import Monitor
from thermoscope.agent.raytrain import watch

log = logging.getLogger("thermoscope.agent")


class ThermoscopeCallback(lightning.pytorch.Callback):
    """Watches a Lightning `Trainer`'s fit (see the module docstring)."""

    def __init__(self, **settings: Any) -> None:
        """`settings` go to `watch` and on to `Monitor`, and win over the trainer's names: e.g.
        `every=`, `job=`, `collector=` (an address; None derives in-process, `monitor.latest()`)."""
        self.settings = settings
        self.monitor: Monitor | None = None
        self._handles: list[RemovableHandle] = []
        self._loss: torch.Tensor | None = None  # the sampled step's batch losses, summed
        self._batches = 0
        self._stepped = 0  # the trainer's global step at the last optimizer step counted

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._close()
        optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers]  # LightningOptimizer's
        for optimizer in optimizers:  # before the monitor's hooks: those run after this one
            if isinstance(optimizer, torch.optim.LBFGS):
                log.warning("thermoscope: %s re-evaluates its closure; its work is read late", optimizer)
            else:
                self._handles.append(optimizer.register_step_pre_hook(_closure_first))
        names = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "local_rank": trainer.local_rank,
            "step": trainer.global_step,
        }
        self._stepped = trainer.global_step
        self.monitor = watch(pl_module, optimizers, **(names | self.settings))

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        if monitor.sampling and (loss := _loss(outputs)) is not None:
            if pl_module.automatic_optimization:
                loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for its backward
            self._loss = loss if self._loss is None else self._loss + loss
            self._batches += 1
        if trainer.global_step != self._stepped:  # an optimizer stepped in this batch
            self._stepped = trainer.global_step
            mean = None if self._loss is None else self._loss / self._batches
            self._loss, self._batches = None, 0
            monitor.step(mean)

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        """Flush (bounded) and end the stream, so the collector sees a rank that finished."""
        self._close()

    def on_exception(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.monitor is not None:
            self.monitor.close()


def _closure_first(
    optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]] | None:
    """Run the step's closure (forward and backward) before the other pre-hooks, and give the step
    a closure that returns its result (see the module docstring)."""
    if kwargs.get("closure") is not None:
        closure, kwargs = kwargs["closure"], dict(kwargs)
    elif args and callable(args[0]):
        closure, args = args[0], args[1:]
    else:
        return None
    with torch.enable_grad():
        result = closure()
    kwargs["closure"] = _done(result)
    return args, kwargs


def _done(result: Any) -> Callable[[], Any]:
    return lambda: result


def _loss(outputs: Any) -> torch.Tensor | None:
    """The loss a `training_step` returned: a tensor, or a dict's "loss" (detached)."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs.detach() if isinstance(outputs, torch.Tensor) else None
