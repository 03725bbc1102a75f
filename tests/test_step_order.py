"""Misuse gives a warning, not a wrong number (issue 24, item 7).

`Monitor.step(loss)` marks the end of an optimizer step. Called before `loss.backward()` or before
`optimizer.step()`, its sample pairs the state with the wrong step: the sampled step's hooks see
which happened (a backward after the last optimizer step; a loss no backward reached), warn once
and drop that sample. A loss that is not one value is refused at the call, with one line.
"""

from __future__ import annotations

import gc
import logging
import threading

import pytest
import torch

from thermoscope.agent import Monitor

from helpers.architectures import build

STEPS = 12
EVERY = 2


def order_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Monitor.step() was called" in r.getMessage()]


def train(name: str, optimizer: str, order: str) -> Monitor:
    """STEPS steps of a real architecture with a real optimizer, `Monitor.step(loss)` placed by
    `order`: "after" (right), "before-optimizer" or "before-backward"; returns the closed monitor."""
    arch = build(name)
    params = arch.model.parameters()
    opt = (
        torch.optim.AdamW(params, lr=1e-3)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    )
    monitor = Monitor(arch.model, opt, every=EVERY)
    for step in range(STEPS):
        loss = arch.loss(step)
        if order == "before-backward":
            monitor.step(loss)
        loss.backward()
        if order == "before-optimizer":
            monitor.step(loss)
        torch.nn.utils.clip_grad_norm_(arch.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if order == "after":
            monitor.step(loss)
    monitor.close()
    return monitor


@pytest.mark.parametrize(("name", "optimizer"), [("gpt2", "adamw"), ("llama", "sgd")])
def test_step_before_optimizer_step_warns_once_and_drops_those_samples(
    name: str, optimizer: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        monitor = train(name, optimizer, "before-optimizer")
    assert monitor.sampled == 0  # every sampled step was called out of order
    (warning,) = order_warnings(caplog)
    assert "before optimizer.step()" in warning


@pytest.mark.parametrize(("name", "optimizer"), [("gpt2", "adamw"), ("llama", "sgd")])
def test_step_before_backward_warns_once_and_drops_those_samples(
    name: str, optimizer: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        monitor = train(name, optimizer, "before-backward")
    # the first step comes before any backward, so nothing tells it is out of order: every later one is
    assert monitor.sampled == 1
    (warning,) = order_warnings(caplog)
    assert "before loss.backward()" in warning


@pytest.mark.parametrize(("name", "optimizer"), [("gpt2", "adamw"), ("llama", "sgd")])
def test_the_right_order_keeps_every_sample_without_a_warning(
    name: str, optimizer: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        monitor = train(name, optimizer, "after")
    assert monitor.sampled == STEPS // EVERY
    assert order_warnings(caplog) == []


def test_two_monitors_training_on_two_threads_each_see_their_own_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A process training two models on two threads, each with its monitor (a test harness, two
    ranks in one process): neither takes the other's backwards for its own loop's order."""
    monitors: dict[str, Monitor] = {}
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        threads = [
            threading.Thread(target=lambda n=name, o=opt: monitors.__setitem__(n, train(n, o, "after")))
            for name, opt in (("gpt2", "adamw"), ("llama", "sgd"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert {name: m.sampled for name, m in monitors.items()} == {
        "gpt2": STEPS // EVERY,
        "llama": STEPS // EVERY,
    }
    assert order_warnings(caplog) == []


def test_accumulation_under_a_grad_scaler_handing_the_undivided_loss_is_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`scaler.scale(loss / 4).backward()` per micro-batch, the last micro-batch's `loss` handed over:
    the loss sits below the graph root backpropagated, so the step is in order."""
    arch = build("bert")
    opt = torch.optim.AdamW(arch.model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    monitor = Monitor(arch.model, opt, every=1)
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        for step in range(3):
            for micro in range(4):
                loss = arch.loss(4 * step + micro)
                scaler.scale(loss / 4).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            monitor.step(loss)
    monitor.close()
    assert monitor.sampled == 3 and order_warnings(caplog) == []


def test_a_closure_optimizer_is_in_order(caplog: pytest.LogCaptureFixture) -> None:
    """`optimizer.step(closure)` runs its backward inside the step: that backward is the step's own."""
    arch = build("resnet")
    opt = torch.optim.SGD(arch.model.parameters(), lr=0.05, momentum=0.9)
    monitor = Monitor(arch.model, opt, every=1)
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        for step in range(3):

            def closure(step: int = step) -> torch.Tensor:
                opt.zero_grad()
                loss = arch.loss(step)
                loss.backward()
                return loss

            loss = opt.step(closure)
            monitor.step(loss)
    monitor.close()
    assert monitor.sampled == 3 and order_warnings(caplog) == []


def test_a_non_scalar_loss_is_refused_with_one_line_and_loses_nothing() -> None:
    """`step(model(x))` is not an energy: ValueError at the call; the monitor goes on as before."""
    arch = build("gpt2")
    opt = torch.optim.AdamW(arch.model.parameters(), lr=1e-3)
    monitor = Monitor(arch.model, opt, every=1)
    logits = arch.model(**arch.batch(0)).logits
    with pytest.raises(ValueError, match=r"scalar loss, got a tensor of shape \(2, 8, 64\)") as refused:
        monitor.step(logits)
    assert "\n" not in str(refused.value)
    loss = arch.loss(0)
    loss.backward()
    opt.step()
    monitor.step(loss)
    assert monitor.sampled == 1 and monitor.latest().energy == pytest.approx(loss.item())
    monitor.close()


def test_an_unsampled_step_runs_no_hook_of_the_order_check() -> None:
    """The order is watched on sampled steps only: between them no global optimizer hook is left."""
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    arch = build("gpt2")
    opt = torch.optim.AdamW(arch.model.parameters(), lr=1e-3)
    gc.collect()  # (a monitor another test dropped unclosed lets its hooks go when collected)
    hooks, before = [], len(_global_optimizer_pre_hooks)
    monitor = Monitor(arch.model, opt, every=3)
    for step in range(6):
        loss = arch.loss(step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
        hooks.append(len(_global_optimizer_pre_hooks) - before)
    monitor.close()
    # armed at the end of the step before each sampled one: the order check and the watch for a
    # rebuilt optimizer (2); the step after a sample, whose gradient gives its work, keeps the
    # watch only (1); every other step runs none
    assert hooks == [1, 0, 2, 1, 0, 2]
    assert monitor.sampled == 2
