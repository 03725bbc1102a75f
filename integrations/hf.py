"""Thermoscope in a Hugging Face `transformers.Trainer`: one callback.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ThermoscopeCallback()])

At train begin it watches the Trainer's model and optimizer (`thermoscope.agent.watch`: the collector
from $THERMOSCOPE_COLLECTOR or the Ray actor, dormant until there is one); after each optimizer step
it hands the step's loss to the monitor; at train end it flushes and closes.

Names: the job is `job=`, else $THERMOSCOPE_JOB, else `TrainingArguments(run_name=)`, else the
launcher's (`identity`); rank, world size and local rank are the arguments' `process_index`,
`world_size` and `local_process_index` (accelerate's view of torch.distributed); the run is the
launcher's, as for `watch`.

The loss: the Trainer backpropagates each micro-batch's loss already divided for gradient
accumulation (by the number of micro-batches, or normalized by the items of the whole accumulation),
and the loss of an optimizer step, the one it logs, is the sum of those. On sampled steps only, the
callback notes the scalars `backward()` is called on (`energy.LossCapture`, unscaled under a
`GradScaler`) and hands their sum to `Monitor.step`, so the energy is the loss the Trainer logs: the
objective whose gradient the optimizer steps on (docs/science.md section 2). A step the
`GradScaler` skipped (fp16 overflow) hands no loss, and the monitor drops it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from thermoscope.agent.energy import LossCapture
from thermoscope.agent.monitor import Monitor
from thermoscope.agent.raytrain import watch


class ThermoscopeCallback(TrainerCallback):
    """Watches a `transformers.Trainer`'s training (see the module docstring)."""

    def __init__(self, **settings: Any) -> None:
        """`settings` go to `watch` and on to `Monitor`, and win over the Trainer's names: e.g.
        `every=`, `job=`, `collector=` (an address; None derives in-process, `monitor.latest()`)."""
        self.settings = settings
        self.monitor: Monitor | None = None
        self._losses: LossCapture | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if self.monitor is not None:  # `train()` again: a new monitor from the step it resumes at
            self.monitor.close()
        names: dict[str, Any] = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "local_rank": args.local_process_index,
            "step": state.global_step,
        }
        if args.run_name and not os.environ.get("THERMOSCOPE_JOB"):
            names["job"] = args.run_name
        self._losses = LossCapture()
        self.monitor = watch(model, _unwrapped(optimizer), **(names | self.settings))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The first micro-batch of an optimizer step: note its losses if the step is sampled."""
        if self.monitor is not None and self._losses is not None and self.monitor.sampling:
            self._losses.arm()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After the optimizer step: the monitor's step, with the step's loss when it is sampled."""
        if self.monitor is None or self._losses is None:
            return
        # the sum over the micro-batches' backward calls
        self.monitor.step(self._losses.take() if self._losses.armed else None)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Flush (bounded) and end the stream, so the collector sees a rank that finished."""
        if self._losses is not None:
            self._losses.disarm()
        if self.monitor is not None:
            self.monitor.close()


def _unwrapped(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (whose own `step` calls it):
    the sampler's step hooks go on the optimizer that updates the parameters."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # type: ignore[union-attr]
    return optimizer
