"""Small monitored trainings: models, and plain training steps on random inputs."""

from __future__ import annotations

import torch
from torch import nn


def small_model(
    inputs: int = 4, hidden: int = 8, activation: type[nn.Module] = nn.ReLU, lr: float = 1e-2
) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """Linear(inputs, hidden), activation, Linear(hidden, 1) seeded with 0, and plain SGD on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inputs, hidden), activation(), nn.Linear(hidden, 1))
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def train_steps(monitor, model, opt, steps: int, batch: int = 16) -> None:
    """`steps` plain training steps on random inputs (loss: the outputs' mean square), monitored."""
    for _ in range(steps):
        loss = model(torch.randn(batch, model[0].in_features)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
