"""The per-layer work is the expected energy change: it follows a large held-out loss, with no drift.

The agent's work is w+_t = <g_{t+1}, theta_{t+1} - theta_t> (the next step's gradient on the
sampled update, docs/science.md section 2); tests/bench/bench_work_estimators.py measures it
against the other candidates.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from thermoscope.agent import Monitor


def held_out_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def run(model, opt, draw, held, steps: int, batch: int, **monitor_args) -> tuple[np.ndarray, float, float]:
    """(the monitor's per-sample work sums, the same-batch work sum in float64, the held-out change)
    over `steps` updates: the sample at step t + 1 carries the work of the update at step t."""
    monitor = Monitor(model, opt, every=1, **monitor_args)
    start = held_out_loss(model, *held)
    works, same_batch = [], 0.0
    for t in range(steps + 1):
        if t == steps:
            end = held_out_loss(model, *held)  # after `steps` updates
        x, y = draw(batch)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.step()
        if t < steps:
            same_batch += sum(
                float((p.grad.double() * (p.detach().double() - b)).sum())
                for p, b in zip(model.parameters(), before, strict=True)
            )
        monitor.step(loss)
        if t > 0:
            works.append(monitor.latest().layer_work.sum())
    monitor.close()
    return np.array(works), same_batch, end - start


def test_in_a_stationary_run_the_work_sums_to_the_held_out_change_without_drift() -> None:
    """Converged linear regression under constant-lr SGD: the held-out loss only fluctuates; the
    sum of w+ stays within its noise of it, where the same-batch work drifts down by
    eta tr(Sigma)/B per step."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    d = 16
    beta = torch.randn(d, 1, generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d, generator=gen)
        return x, x @ beta + 0.5 * torch.randn(n, 1, generator=gen)

    held = draw(20_000)
    model = nn.Linear(d, 1)
    with torch.no_grad():  # start at the optimum: stationary from the first step
        x, y = held
        solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
        model.weight.copy_(solution[:d].T)
        model.bias.copy_(solution[d:, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.005)
    works, same_batch, change = run(model, opt, draw, held, steps=300, batch=16)
    noise = works.std() * math.sqrt(len(works))
    assert abs(works.sum() - change) < 3 * noise
    assert same_batch - change < -10 * noise  # what the same-batch work would have read: a drift


def test_in_a_learning_run_the_work_follows_the_held_out_loss_to_first_order() -> None:
    """A teacher-student MLP learning under Adam, with a 65,536-value layer whose work is
    subsampled (1/16 of its coordinates): the sum of w+ tracks the held-out loss's fall."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def mlp() -> nn.Sequential:
        return nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))

    teacher, model = mlp(), mlp()

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16, generator=gen)
        with torch.no_grad():
            return x, teacher(x)

    held = draw(4_000)
    # a small step, where first order holds: w+ counts the curvature term (d^T H d / 2 per step)
    # once too often, which at lr 1e-3 here outweighs the fall (measured: +0.04 against -0.08)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    works, same_batch, change = run(model, opt, draw, held, steps=60, batch=32, subset=1 << 12)
    assert change < 0
    assert abs(works.sum() / change - 1) < 0.2  # measured: 0.89
    assert abs(works.sum() - change) < abs(same_batch - change)  # the same-batch work reads 1.20
