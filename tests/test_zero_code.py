"""Zero-code instrumentation (the Ray worker_process_setup_hook), here in a plain process."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from thermoscope.agent import raytrain
from thermoscope.collector.service import Collector

from helpers.training import small_model


@pytest.fixture
def auto(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> Iterator[raytrain._AutoWatch]:
    monkeypatch.setenv("THERMOSCOPE_COLLECTOR", collector.grpc_target)
    monkeypatch.setenv("THERMOSCOPE_JOB", "zero-code")
    agent = raytrain._AutoWatch()
    try:
        yield agent
    finally:
        agent.close()


def untouched_training(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """A training loop with no Thermoscope line in it; the loss of each step."""
    loss_fn = nn.MSELoss()  # a module called at the top level too: not the model
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = loss_fn(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_setup_hook_finds_the_model_of_the_first_optimizer_step_and_streams_it(
    auto: raytrain._AutoWatch, collector: Collector
) -> None:
    model, opt = small_model(8, 32, nn.Tanh, lr=0.05)
    untouched_training(model, opt, 1)
    monitor = auto.monitor
    assert monitor is not None and monitor.layers[0].name == "0.weight"
    assert [s.name for s in monitor.sites] == ["1"]
    deadline = time.monotonic() + 5
    while monitor.dormant:  # it looks the collector up on its own thread
        assert time.monotonic() < deadline
        time.sleep(0.01)
    losses = untouched_training(model, opt, 30)  # steps 1 to 30
    assert monitor.flush(5)
    job = collector.jobs["zero-code"]
    assert job.frames_received == 3  # steps 10, 20, 30: counted from the optimizer's own steps
    assert job.reading.step == 30
    # the energy is the loss the loop called backward() on, captured with no code change
    assert not job.reading.energy_from_work
    assert job.reading.energy == pytest.approx(losses[29], rel=1e-6)
    assert sum(p.numel() for p in model.parameters()) == sum(layer.numel for layer in monitor.layers)


def test_the_global_forward_hooks_are_gone_after_the_first_step(auto: raytrain._AutoWatch) -> None:
    untouched_training(*small_model(8, 32, nn.Tanh, lr=0.05), 1)
    assert not nn.modules.module._global_forward_pre_hooks
    assert not nn.modules.module._global_forward_hooks


def test_setup_is_a_no_op_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THERMOSCOPE_DISABLE", "1")
    monkeypatch.setattr(raytrain, "_agent", None)
    raytrain.setup()
    assert raytrain._agent is None
