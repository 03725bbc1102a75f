"""The demo's run (a student learning a teacher) on a thread, streaming to a collector, for the
tests that watch what the collector shows while a real training loop runs."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from thermoscope.agent.monitor import Monitor
from thermoscope.cli.demo import student, teacher_student


class DemoRun:
    """`steps` steps of the demo's training as job `job`, paced by `pace` s a step, sampled every
    `every`; a context manager that starts it and, on leaving, stops it and re-raises its error."""

    def __init__(self, target: str, job: str, *, steps: int = 400, every: int = 5, pace: float = 0.0) -> None:
        self.target, self.job, self.steps, self.every, self.pace = target, job, steps, every, pace
        self.stop = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="demo-run", daemon=True)

    def _run(self) -> None:
        try:
            torch.manual_seed(0)
            x, y = teacher_student(0)
            model = student(x.shape[1])
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(1)
            monitor = Monitor(model, optimizer, collector=self.target, job=self.job, every=self.every)
            try:
                for _ in range(self.steps):
                    if self.stop.is_set():
                        break
                    idx = torch.randint(0, x.shape[0], (64,), generator=gen)
                    loss = nn.functional.mse_loss(model(x[idx]), y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    monitor.step(loss)
                    time.sleep(self.pace)
            finally:
                monitor.close(timeout=10)
        except BaseException as exc:  # re-raised by __exit__
            self.error = exc
        finally:
            self.done.set()

    def __enter__(self) -> DemoRun:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the training thread did not stop"
        if self.error is not None:
            raise self.error
