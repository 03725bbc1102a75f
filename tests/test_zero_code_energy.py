"""A real energy without code changes: the loss `backward()` is called on (docs/science.md section 2).

A `Monitor` stepped without a loss (and the zero-code agent, which never has one) captures the
scalars backpropagated before each sampled optimizer step: their sum, the objective whose gradient
the optimizer steps on (unscaled under `GradScaler`; a step it skipped is no step); cumulative work
only where no loss is seen.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor, raytrain
from thermoscope.cli.demo import student, teacher_student
from thermoscope.collector.service import Collector

from helpers.architectures import build
from helpers.training import small_model

JOB = "zero-code-energy"


def accumulating_training(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    monitor: Monitor,
    steps: int,
    micro: int,
    backward,
    scaler: torch.amp.GradScaler | None = None,
    divide: bool = False,
) -> dict[int, tuple[float, float, bool]]:
    """`steps` optimizer steps of `micro` micro-batches each, no loss handed over, each micro-batch's
    loss divided by `micro` before its backward if `divide`; for each sampled step, (the mean of its
    micro-batch losses, the energy read, whether it was the cumulative work)."""
    sampled = {}
    for step in range(steps):
        losses = []
        for _ in range(micro):
            loss = model(torch.randn(16, model[0].in_features)).square().mean()
            losses.append(loss.item())
            backpropagated = loss / micro if divide else loss
            backward(backpropagated if scaler is None else scaler.scale(backpropagated))
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        monitor.step()
        reading = monitor.latest()
        if reading is not None and reading.step == step:
            sampled[step] = (float(np.mean(losses)), reading.energy, reading.energy_from_work)
    monitor.close()
    return sampled


@pytest.mark.parametrize(
    "backward",
    [lambda t: t.backward(), lambda t: torch.autograd.backward(t), lambda t: torch.autograd.backward([t])],
    ids=["Tensor.backward", "autograd.backward", "autograd.backward-list"],
)
def test_without_a_loss_the_energy_is_the_loss_backpropagated(backward) -> None:
    model, opt = small_model(8, 32, nn.Tanh, lr=0.05)
    sampled = accumulating_training(model, opt, Monitor(model, opt, every=2), 6, 1, backward)
    assert sorted(sampled) == [0, 2, 4]
    for loss, energy, from_work in sampled.values():
        assert energy == pytest.approx(loss, rel=1e-6) and not from_work


def test_accumulation_of_divided_losses_reads_the_mean_loss() -> None:
    """`(loss / 4).backward()` per micro-batch: the optimizer steps on the mean loss's gradient, and
    the energy is the mean loss (it read a quarter of it, the mean of the quarters, before)."""
    model, opt = small_model(8, 32, nn.Tanh, lr=0.05)
    monitor = Monitor(model, opt, every=3)
    sampled = accumulating_training(model, opt, monitor, 9, 4, lambda t: t.backward(), divide=True)
    assert sorted(sampled) == [0, 3, 6]
    for mean, energy, from_work in sampled.values():
        assert energy == pytest.approx(mean, rel=1e-6) and not from_work


def test_accumulation_of_undivided_losses_reads_their_sum() -> None:
    """`loss.backward()` 4 times undivided: the gradient stepped on is 4 times the mean loss's, and
    so is the energy (docs/science.md section 2 says what such a loop sees)."""
    model, opt = small_model(8, 32, nn.Tanh, lr=0.05)
    sampled = accumulating_training(model, opt, Monitor(model, opt, every=3), 9, 4, lambda t: t.backward())
    assert sorted(sampled) == [0, 3, 6]
    for mean, energy, from_work in sampled.values():
        assert energy == pytest.approx(4 * mean, rel=1e-6) and not from_work


def test_a_loss_of_two_terms_backpropagated_separately_reads_their_sum() -> None:
    """A GPT-2 language-model loss plus an L2 penalty, each with its own backward (AdamW): the energy
    is the objective, loss + penalty (it read their mean, about half, before)."""
    arch = build("gpt2")
    opt = torch.optim.AdamW(arch.model.parameters(), lr=1e-3)
    monitor = Monitor(arch.model, opt, every=2)
    for step in range(6):
        loss = arch.loss(step)
        penalty = 1e-3 * sum(p.square().sum() for p in arch.model.parameters())
        loss.backward()
        penalty.backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
        reading = monitor.latest()
        if reading.step == step:
            assert reading.energy == pytest.approx(loss.item() + penalty.item(), rel=1e-6)
            assert not reading.energy_from_work
    assert monitor.sampled == 3
    monitor.close()


def skipping_training(monitor_on_skip: bool) -> tuple[Monitor, list[float], list[float]]:
    """Llama under SGD with momentum and a CPU `GradScaler`, every step sampled; the first of each
    pair of steps gets an inf gradient (an fp16 overflow), so the scaler skips its optimizer step.
    The monitor is stepped by an optimizer post-hook, as the zero-code agent does, and also after
    each skipped step if `monitor_on_skip`. Returns the monitor (closed), the losses of the
    skipped steps and the energies read after the others."""
    arch = build("llama")
    opt = torch.optim.SGD(arch.model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    monitor = Monitor(arch.model, opt, every=1)
    opt.register_step_post_hook(lambda *_: monitor.step())
    skipped, energies = [], []
    for step in range(8):
        loss = arch.loss(step)
        scaler.scale(loss).backward()
        if step % 2 == 0:
            next(arch.model.parameters()).grad[0, 0] = math.inf
        stepped = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if scaler.get_scale() < stepped:  # the scale backs off: the step was skipped
            skipped.append(loss.item())
            if monitor_on_skip:
                monitor.step()
        else:
            reading = monitor.latest()
            assert reading.energy == pytest.approx(loss.item(), rel=1e-6) and not reading.energy_from_work
            energies.append(reading.energy)
    monitor.close()
    return monitor, skipped, energies


def test_a_step_the_grad_scaler_skipped_is_dropped_not_folded_into_the_next_energy() -> None:
    """Zero-code counts optimizer steps: a skipped one is not one, and its loss is not added to the
    next step's energy (before: the mean of both; with a sum, a false jump)."""
    monitor, skipped, energies = skipping_training(monitor_on_skip=False)
    assert len(skipped) == len(energies) == 4
    assert monitor.sampled == 4


def test_a_skipped_step_handed_to_step_is_dropped_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A loop that calls `Monitor.step()` after a skipped `scaler.step`: that sample is no step's."""
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        monitor, skipped, energies = skipping_training(monitor_on_skip=True)
    assert len(skipped) == len(energies) == 4
    assert monitor.sampled == 4  # only the steps the optimizer took
    assert not [r for r in caplog.records if "Monitor.step" in r.getMessage()]


def test_under_a_grad_scaler_the_energy_is_the_unscaled_loss() -> None:
    """torch's GradScaler runs on CPU: the scaled loss is loss * 2^k; the energy is the loss."""
    model, opt = small_model(8, 32, nn.Tanh, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)  # the scale moves
    monitor = Monitor(model, every=2)  # optimizer=None: torch's global optimizer hooks, as zero-code
    sampled = accumulating_training(model, opt, monitor, 8, 2, lambda t: t.backward(), scaler)
    assert scaler.get_scale() > 2.0**12  # grown during the run, in place after each backward
    assert sorted(sampled) == [0, 2, 4, 6]
    for mean, energy, from_work in sampled.values():
        assert energy == pytest.approx(2 * mean, rel=1e-6) and not from_work  # 2 undivided micro-batches


def test_backward_calls_made_inside_a_backward_are_not_the_loss() -> None:
    """Reentrant activation checkpointing calls torch.autograd.backward on non-scalars during the
    loss's backward: those calls are not losses and leave the step's energy the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, opt, every=1)
    x = torch.randn(16, 8, requires_grad=True)  # the reentrant variant needs an input that requires grad
    hidden = torch.utils.checkpoint.checkpoint(model[:2], x, use_reentrant=True)
    loss = model[2](hidden).square().mean()
    loss.backward()
    opt.step()
    monitor.step()
    reading = monitor.latest()
    monitor.close()
    assert not reading.energy_from_work and reading.energy == pytest.approx(loss.item(), rel=1e-6)


def test_a_loss_handed_to_step_wins_over_the_captured_one() -> None:
    model, opt = small_model(8, 32, nn.Tanh, lr=0.05)
    monitor = Monitor(model, opt, every=1)
    for given in (5.0, 7.0):
        model(torch.randn(16, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        monitor.step(given)
        assert monitor.latest().energy == given
    model(torch.randn(16, 8)).square().mean().backward()
    assert monitor._losses.armed and monitor._losses._sum is None  # armed for the loop's order alone
    monitor.close()


def test_without_a_visible_loss_the_energy_falls_back_to_the_cumulative_work() -> None:
    """A backward on a non-scalar (an explicit gradient) is no loss: the energy is the work, and says so."""
    model, opt = small_model(8, 32, nn.Tanh, lr=0.05)
    monitor = Monitor(model, opt, every=2)
    energies = {}
    for _ in range(6):
        out = model(torch.randn(16, 8))
        out.backward(2 * out.detach() / out.numel())  # the gradient of the mean square, by hand
        opt.step()
        opt.zero_grad()
        monitor.step()
        reading = monitor.latest()
        assert reading.energy_from_work
        energies[reading.step] = reading.energy
    monitor.close()
    assert sorted(energies) == [0, 2, 4]
    assert energies[0] == 0.0 and energies[4] < 0  # the cumulative work: descent makes it fall


def test_a_sampled_step_makes_no_host_sync_for_the_loss() -> None:
    """The captured loss stays a detached tensor until the sampler packs it (no .item() on the way)."""
    model, opt = small_model(8, 32, nn.Tanh, lr=0.05)
    monitor = Monitor(model, opt, every=1)
    loss = model(torch.randn(16, 8)).square().mean()
    loss.backward()
    taken = monitor._losses.take()
    assert isinstance(taken, torch.Tensor) and taken.dtype == torch.float64 and not taken.requires_grad
    assert taken.item() == pytest.approx(loss.item(), rel=1e-12)
    monitor.close()


# -- zero-code, streamed to a real collector ------------------------------------------------------


@pytest.fixture
def collector5(tmp_path: Path) -> Iterator[Collector]:
    """A collector that asks its agents for one sample in 5 steps (as the demo's run takes them)."""
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "events.db", every=5).running() as c:
        yield c


@pytest.fixture
def auto(collector5: Collector, monkeypatch: pytest.MonkeyPatch) -> Iterator[raytrain._AutoWatch]:
    monkeypatch.setenv("THERMOSCOPE_COLLECTOR", collector5.grpc_target)
    monkeypatch.setenv("THERMOSCOPE_JOB", JOB)
    agent = raytrain._AutoWatch()
    try:
        yield agent
    finally:
        agent.close()


def teacher_student_untouched(steps: int, shift_at: int | None, wait_for_agent) -> None:
    """The demo's run (a student MLP learning a tanh teacher, Adam) with no Thermoscope line in it."""
    torch.manual_seed(0)
    x, y = teacher_student(0)
    model = student(x.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == shift_at:
            x, y = teacher_student(1000)
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            wait_for_agent()


def job_phases(collector: Collector) -> list[tuple[int, str, str]]:
    collector.checkpoint()
    return [(e.step, e.from_, e.to) for e in collector.store.query(job=JOB) if e.scope == "job"]


def _waiter(auto: raytrain._AutoWatch):
    def wait() -> None:
        deadline = time.monotonic() + 10
        while auto.monitor is None or auto.monitor.dormant:  # it looks the collector up on its own thread
            assert time.monotonic() < deadline
            time.sleep(0.01)

    return wait


@pytest.mark.slow
def test_a_zero_code_run_reaches_equilibrium_and_sees_a_data_shift_as_refresh(
    auto: raytrain._AutoWatch, collector5: Collector
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher_student_untouched(1200, 600, _waiter(auto))
    finally:
        torch.set_num_threads(threads)
    assert auto.monitor.flush(10)
    reading = collector5.jobs[JOB].reading
    assert not reading.energy_from_work and reading.energy > 0  # a loss, not the cumulative work
    phases = job_phases(collector5)
    to = [t for _, _, t in phases]
    assert to[:2] == ["transition", "type_ii"], phases  # where the cumulative work stayed in transition
    assert next(s for s, _, t in phases if t == "type_ii") < 600
    assert "refresh" in to and next(s for s, _, t in phases if t == "refresh") >= 600, phases
    assert "unstable" not in to, phases
