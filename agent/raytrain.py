"""Thermoscope in Ray Train workers: one line (`watch`), or none (`setup`).

    def train_loop(config):
        model = ray.train.torch.prepare_model(build_model())
        optimizer = torch.optim.AdamW(model.parameters())
        monitor = thermoscope.agent.watch(model, optimizer)
        for batch in data:
            ...
            optimizer.step()
            monitor.step(loss)

`watch` takes the job, run and rank from Ray; it finds the collector by itself (the
detached actor that `thermoscope attach` starts, see `discovery`) and stays dormant —
hooks off, nothing sampled — until there is one, so the same code runs with or without
Thermoscope attached.

Zero-code mode: launch the job with

    runtime_env={"worker_process_setup_hook": "thermoscope.agent.raytrain.setup"}

and every Ray worker of the job installs two process-wide torch hooks. A global module
forward pre-hook notes the outermost modules called until the first optimizer step; a
global optimizer step post-hook then picks, among them, the model holding that optimizer's
parameters, watches it, and removes both global hooks. From then on the monitor's step
is counted by a post-hook on that optimizer alone. No loss is handed over: on sampled steps
the monitor captures the scalars `backward()` is called on (their sum since the last
optimizer step, unscaled under `GradScaler`; `energy.LossCapture`), and only where none is seen is the energy
the cumulative work (see `derive`). Processes that never step an optimizer (the Train
controller, data workers) pay one dictionary insert per outermost module call. The
stream ends (flushed, half-closed: the collector sees a rank that finished, not one that was
lost) when the thread that trained ends — Ray Train runs the training function on a thread
of its own, and stops the worker without running exit handlers — or at interpreter exit.

Identity: `job` is Ray's job id (`ray.get_runtime_context().get_job_id()`); `run` is the
Train run's name (`RunConfig(name=...)`, by default Ray's unique, time-stamped
`ray_train_run-<date>_<time>`), so a worker that Ray Train restarts rejoins the same run:
the collector counts the steps it replays once.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from . import discovery
from .identity import launcher_identity
from .monitor import Monitor

log = logging.getLogger("thermoscope.agent")


def ray_identity() -> dict[str, Any]:
    """job, run, rank and world size of this process, from Ray Train where it runs in one.

    Outside a Ray worker (torchrun, `accelerate launch`, a plain process) they come from the
    launcher's environment and torch.distributed (`identity.launcher_identity`).
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return launcher_identity()
    identity: dict[str, Any] = {}
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        identity |= {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    context = ray.get_runtime_context()
    identity |= {"job": context.get_job_id(), "node": context.get_node_id()}
    try:
        ctx = ray.train.get_context()
        identity |= {
            "run": ctx.get_experiment_name(),
            "rank": ctx.get_world_rank(),
            "world_size": ctx.get_world_size(),
            "local_rank": ctx.get_local_rank(),
        }
    except (RuntimeError, AttributeError, ValueError):  # a Ray worker, but not a Train worker
        pass
    return identity


def watch(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **settings: Any) -> Monitor:
    """A `Monitor` of `model` that finds its collector and names itself from Ray.

    `settings` go to `Monitor` and take precedence (e.g. `every=`, `step=` when resuming
    from a checkpoint, `collector=` to give an address).
    """
    options: dict[str, Any] = {"collector": discovery.find_collector, **ray_identity()}
    options.update(settings)
    return Monitor(model, optimizer, **options)


class _AutoWatch:
    """The zero-code agent of one process (see the module docstring)."""

    def __init__(self) -> None:
        self.monitor: Monitor | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._roots: dict[int, weakref.ref[nn.Module]] = {}
        self._depth = threading.local()
        self._forward_hooks: list[RemovableHandle] = [
            nn.modules.module.register_module_forward_pre_hook(self._enter),
            nn.modules.module.register_module_forward_hook(self._leave),
        ]
        # Global post-hooks run after the optimizer's own ones, so the sampler's work hook has
        # run when the step is counted. It stays registered: torch iterates the hook dict
        # while calling it, so it must not remove itself.
        self._step_hook = register_optimizer_step_post_hook(self._after_step)

    def _enter(self, module: nn.Module, args: tuple) -> None:
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            self._roots[id(module)] = weakref.ref(module)
        self._depth.n = depth + 1

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        self._depth.n = max(getattr(self._depth, "n", 1) - 1, 0)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if optimizer is self._optimizer:
            self.monitor.step()  # type: ignore[union-attr]
        elif self._optimizer is None and self._forward_hooks:
            self._first_step(optimizer)

    def _first_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Find the model this optimizer trains, and watch it from the next step on."""
        for handle in self._forward_hooks:
            handle.remove()
        self._forward_hooks.clear()
        model = _model_of(optimizer, [m for ref in self._roots.values() if (m := ref()) is not None])
        self._roots.clear()
        if model is None:
            log.warning("thermoscope: no module called before the first optimizer step holds its parameters")
            return
        try:
            self.monitor = watch(model, optimizer, step=1)
        except Exception:  # instrumentation must never break the user's job
            log.exception("thermoscope: could not watch the model; training continues unmonitored")
            return
        self._optimizer = optimizer
        trainer = threading.current_thread()
        if trainer is not threading.main_thread():  # Ray Train: the training function's own thread
            threading.Thread(
                target=self._close_after, args=(trainer,), name="thermoscope-end", daemon=True
            ).start()

    def _close_after(self, trainer: threading.Thread) -> None:
        """End the stream when the training thread ends, so the collector sees ranks that finished."""
        trainer.join()
        self.close(2.0)

    def close(self, timeout: float = 5.0) -> None:
        """Remove the hooks; flush and end the stream (bounded), so the rank ends as finished."""
        for handle in (*self._forward_hooks, self._step_hook):
            handle.remove()
        if self.monitor is not None:
            self.monitor.close(timeout)


def _model_of(optimizer: torch.optim.Optimizer, roots: list[nn.Module]) -> nn.Module | None:
    """The root module holding most of the optimizer's parameters (None if none holds any)."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    best, held = None, 0
    for root in roots:
        n = sum(id(p) in params for p in root.parameters())
        if n > held:
            best, held = root, n
    return best


_agent: _AutoWatch | None = None


def setup() -> None:
    """The `worker_process_setup_hook`: instrument this process's training, with no code change.

    Set `THERMOSCOPE_DISABLE=1` in the job's environment to make it a no-op.
    """
    global _agent
    if _agent is None and os.environ.get("THERMOSCOPE_DISABLE") != "1":
        _agent = _AutoWatch()
        atexit.register(_agent.close, 2.0)
