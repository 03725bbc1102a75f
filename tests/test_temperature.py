"""Honest temperatures: a layer's and the job's T carry a standard error from the window's scatter,
and are undefined (NaN) unless both their entropy and energy changes are significant.

The runs are real: a linear regression trained by constant-lr SGD with a `Monitor` in-process
(`Monitor.latest()` after each sampled step), once converged (stationary: E and S only fluctuate)
and once learning (the weights grow from a small initialization towards a larger teacher, so the
entropy moves). The statistics are checked against simulation: the t-quantiles against their
tables, the test's false-positive rate on noise, the delta-method error against the scatter of T.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from thermoscope.agent.monitor import Monitor
from thermoscope.science import physics
from thermoscope.science.derive import WINDOW, Reading


def regression_readings(
    *, converged: bool, steps: int, lr: float, batch: int, dim: int = 16, bias: bool = True, every: int = 5
) -> list[Reading]:
    """Every reading of a monitored linear regression y = x . teacher + noise under constant-lr SGD,
    started at the teacher (`converged`) or from a 0.01-scale initialization."""
    torch.manual_seed(0)
    teacher = torch.randn(dim)
    model = nn.Linear(dim, 1, bias=bias)
    with torch.no_grad():
        model.weight.copy_(teacher[None] if converged else 0.01 * torch.randn(1, dim))
        if bias:
            model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = Monitor(model, opt, every=every)
    readings = []
    for step in range(steps):
        x = torch.randn(batch, dim)
        loss = (model(x).squeeze(-1) - (x @ teacher + 0.5 * torch.randn(batch))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
        if step % every == 0:
            readings.append(monitor.latest())
    monitor.close()
    return readings


def test_a_stationary_regression_leaves_layer_and_job_temperatures_undefined_most_of_the_time() -> None:
    readings = regression_readings(converged=True, steps=800, lr=0.05, batch=16, every=4)[WINDOW:]
    layer_t = np.array([r.layer_temperature for r in readings])
    undefined = np.isnan(layer_t).mean(axis=0)
    assert (undefined >= 0.85).all(), dict(zip(readings[-1].layer_names, undefined, strict=True))
    assert np.isnan([r.temperature for r in readings]).mean() >= 0.85
    # beta stays finite all the same (but the 1-value bias's: no spread, no entropy reading, no beta),
    # and a defined T always comes with its standard error
    beta = np.array([r.layer_beta for r in readings])
    spreads = [name != "bias" for name in readings[-1].layer_names]
    assert np.isfinite(beta[:, spreads]).all() and np.isnan(beta[:, ~np.array(spreads)]).all()
    layer_err = np.array([r.layer_temperature_stderr for r in readings])
    assert np.array_equal(np.isnan(layer_t), np.isnan(layer_err))


def test_a_learning_layer_keeps_a_defined_negative_temperature_with_a_finite_stderr() -> None:
    """The weights spread from 0.01 towards a teacher of scale 1 while the loss falls: T < 0 (the
    entropy grows as the energy falls), defined while the entropy moves, with its standard error."""
    readings = regression_readings(converged=False, steps=700, lr=0.003, batch=64, dim=32, bias=False)
    entropy = np.array([r.layer_entropy[0] for r in readings])
    # learning: from the first full window until the entropy has made 90 % of its change
    moving = np.abs(entropy - entropy[0]) < 0.9 * abs(entropy[-1] - entropy[0])
    learning = [r for r, m in zip(readings, moving, strict=True) if m][WINDOW:]
    assert len(learning) >= 20, len(learning)
    t = np.array([r.layer_temperature[0] for r in learning])
    err = np.array([r.layer_temperature_stderr[0] for r in learning])
    defined = np.isfinite(t)
    assert defined.mean() >= 0.8, defined.mean()
    assert (t[defined] < 0).all() and (err[defined] > 0).all() and np.isfinite(err[defined]).all()
    assert np.median(err[defined] / np.abs(t[defined])) < 0.5  # resolved, not merely defined
    job_t = np.array([r.temperature for r in learning])
    job_err = np.array([r.temperature_stderr for r in learning])
    assert np.isfinite(job_t).mean() >= 0.8, np.isfinite(job_t).mean()
    assert (job_t[np.isfinite(job_t)] < 0).all() and np.isfinite(job_err[np.isfinite(job_t)]).all()


@pytest.mark.parametrize(
    ("dof", "table"), [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (8, 2.306), (9, 2.262), (30, 2.042)]
)
def test_t_quantile_matches_the_students_t_table(dof: int, table: float) -> None:
    assert physics.t_quantile(dof) == pytest.approx(table, rel=2e-3)
    assert physics.t_quantile(0) == math.inf


def test_noise_alone_is_significant_about_one_minus_the_confidence_of_the_time() -> None:
    rng = np.random.default_rng(3)
    steps = np.cumsum(rng.integers(1, 4, size=WINDOW))  # uneven gaps
    walks = 4000
    x = np.cumsum(rng.normal(size=(WINDOW, walks)) * np.sqrt(np.diff(steps, prepend=0))[:, None], axis=0)
    y = rng.normal(size=(WINDOW, walks))
    dx, _, var_x, _, _ = physics.window_changes(x, y, steps)
    significant = np.abs(dx) > physics.t_quantile(WINDOW - 2) * np.sqrt(var_x)
    assert 0.02 <= significant.mean() <= 0.08, significant.mean()


def test_the_delta_method_error_is_the_scatter_of_the_temperature() -> None:
    """Windows of increments with a drift and correlated noise: the median stderr of T is its
    spread over many windows, and the changes are their increments' sums."""
    rng = np.random.default_rng(4)
    n, windows = WINDOW - 1, 20_000
    noise = rng.multivariate_normal([0, 0], [[1.0, 0.5], [0.5, 2.0]], size=(n, windows))
    ds, de = 3.0 + noise[..., 0], -2.0 + noise[..., 1]
    s = np.concatenate([np.zeros((1, windows)), np.cumsum(ds, axis=0)])
    e = np.concatenate([np.zeros((1, windows)), np.cumsum(de, axis=0)])
    delta_s, delta_e, var_s, var_e, cov = physics.window_changes(s, e, np.arange(n + 1) * 10)
    assert np.allclose(delta_s, ds.sum(axis=0)) and np.allclose(delta_e, de.sum(axis=0))
    err = physics.temperature_stderr(delta_s, delta_e, var_s, var_e, cov)
    t = delta_e / delta_s
    assert np.median(err) == pytest.approx(t.std(), rel=0.1)


def test_a_reading_saved_before_standard_errors_existed_reads_them_as_unknown() -> None:
    reading = regression_readings(converged=True, steps=30, lr=0.05, batch=8)[-1]
    state = dict(reading.__dict__)
    del state["temperature_stderr"], state["layer_temperature_stderr"]
    old = Reading.__new__(Reading)
    old.__setstate__(state)
    assert math.isnan(old.temperature_stderr) and np.isnan(old.layer_temperature_stderr).all()
    assert old.layer_temperature_stderr.shape == reading.layer_temperature.shape


def test_a_zero_initialized_layer_has_no_entropy_nor_temperature_while_its_window_holds_the_floor() -> None:
    """LoRA's B starts at zero: its variance sits at the floor (it read -33 nats a value, -4239
    for its 128 values) and climbs from there, which is no entropy change. Such a layer reads NaN
    until it spreads, and a window holding a floored sample has no temperature for it."""
    torch.manual_seed(0)
    down, up = nn.Linear(32, 4, bias=False), nn.Linear(4, 32, bias=False)
    nn.init.zeros_(up.weight)  # as peft initializes lora_B
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), down, up)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = Monitor(model, opt, every=1)
    teacher = torch.randn(32, 32)
    readings = []
    for _ in range(3 * WINDOW):
        x = torch.randn(64, 32)
        loss = (model(x) - x @ teacher).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
        readings.append(monitor.latest())
    monitor.close()
    b = list(readings[0].layer_names).index("3.weight")
    assert math.isnan(readings[0].layer_entropy[b])  # at the floor: no reading
    assert all(math.isfinite(r.layer_entropy[b]) for r in readings[1:])  # AdamW spread it at once
    assert all(math.isnan(r.layer_temperature[b]) for r in readings[:WINDOW])  # the floor in the window
    # the job's entropy stays continuous: it still counts the floored layer at its floor
    assert all(math.isfinite(r.entropy) for r in readings)
