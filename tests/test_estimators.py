"""Histogram entropy on fixed edges over a fixed subset, and the engine-type probe (docs/science.md 3, 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.agent.sampler import SHAPE_EVERY, SUBSET
from thermoscope.science import physics

N = 1 << 20  # values in the layer; the histogram counts SUBSET = 65,536 of them

DISTRIBUTIONS = {
    # name: (sampler, exact differential entropy per value)
    "normal": (lambda g: torch.randn(N, generator=g) * 0.02, 0.5 * math.log(2 * math.pi * math.e * 0.02**2)),
    "uniform": (lambda g: (torch.rand(N, generator=g) * 2 - 1) * 0.05, math.log(0.1)),
    "laplace": (
        lambda g: -0.03 * torch.sign(u := torch.rand(N, generator=g) - 0.5) * torch.log1p(-2 * u.abs()),
        1 + math.log(0.06),
    ),
}


def layer_of(values: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.w = nn.Parameter(values)
    return module


def reading_of(values: torch.Tensor, **kw):
    monitor = Monitor(layer_of(values), every=1, **kw)
    monitor.step(None)
    reading = monitor.latest()
    monitor.close()
    return reading


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_histogram_entropy_of_a_65536_value_subset_is_within_001_nats(name: str) -> None:
    draw, exact = DISTRIBUTIONS[name]
    errors = []
    for seed in range(4):
        r = reading_of(draw(torch.Generator().manual_seed(seed)))
        errors.append(r.layer_histogram_entropy[0] / N - exact)
    assert SUBSET == 65_536
    assert max(abs(e) for e in errors) < 0.01, errors
    assert abs(np.mean(errors)) < 0.006, errors  # no bias beyond the plug-in estimator's own


def test_negentropy_is_zero_for_normal_and_the_known_gap_for_uniform() -> None:
    normal = reading_of(DISTRIBUTIONS["normal"][0](torch.Generator().manual_seed(0)))
    uniform = reading_of(DISTRIBUTIONS["uniform"][0](torch.Generator().manual_seed(0)))
    assert normal.layer_negentropy[0] == pytest.approx(0.0, abs=0.01)
    # gaussian minus exact for U(-a, a): 1/2 ln(2 pi e a^2 / 3) - ln(2a) = 0.1765
    assert uniform.layer_negentropy[0] == pytest.approx(0.5 * math.log(math.pi * math.e / 6), abs=0.01)


def test_the_subset_is_fixed_so_an_unchanged_layer_counts_the_same_values() -> None:
    model = layer_of(torch.randn(N))
    monitor = Monitor(model, every=1)
    samples = []
    for _ in range(SHAPE_EVERY + 1):
        monitor.step(None)
        samples.append(monitor.sink.pending[-1].to_sample())
    monitor.close()
    taken = [s.layers.histogram is not None for s in samples]
    assert taken == [True] + [False] * (SHAPE_EVERY - 1) + [True]  # a shape sample every SHAPE_EVERY
    np.testing.assert_array_equal(samples[0].layers.histogram, samples[-1].layers.histogram)
    assert samples[0].layers.histogram.sum() == SUBSET


def test_readings_between_histograms_keep_the_last_shape() -> None:
    monitor = Monitor(layer_of(torch.randn(N)), every=1)
    monitor.step(None)
    first = monitor.latest()
    monitor.step(None)
    second = monitor.latest()
    monitor.close()
    assert np.isfinite(first.layer_negentropy).all()
    np.testing.assert_array_equal(first.layer_negentropy, second.layer_negentropy)


def test_replicas_fix_the_same_edges_and_values_beyond_them_are_counted() -> None:
    torch.manual_seed(0)
    a = nn.Linear(300, 300)
    b = nn.Linear(300, 300)
    b.load_state_dict(a.state_dict())
    edges_a = [(layer.hist_lo, layer.hist_hi) for layer in Monitor(a, every=1).layers]
    monitor = Monitor(b, every=1)
    assert [(layer.hist_lo, layer.hist_hi) for layer in monitor.layers] == edges_a
    with torch.no_grad():
        b.weight.mul_(100.0)  # far past the edges fixed at the start
    monitor.step(None)
    r = monitor.latest()
    monitor.close()
    assert r.layer_outside[0] > 0.9
    assert r.layer_outside[1] == 0.0


def test_constant_tensors_get_finite_edges() -> None:
    for mean in (0.0, 1.0, -3.0):
        lo, hi = physics.histogram_edges(mean, 0.0)
        assert lo < mean < hi and math.isfinite(lo) and math.isfinite(hi)


SCALES = [0.1, 1.0, 10.0]
TYPE_A = {"identity": nn.Identity(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1)}
TYPE_B = {"tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU(), "silu": nn.SiLU()}


def engine_of(activation: nn.Module, scale: float) -> tuple[str, str]:
    """(site type, network type) of Linear -> activation at an input temperature set by `scale`."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), activation)
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(64))
        model[0].bias.normal_(0, 0.5 * scale)  # z's mean moves too: the type must not
    monitor = Monitor(model, every=1)
    model(torch.randn(256, 64) * scale)
    monitor.step(None)
    r = monitor.latest()
    monitor.close()
    return str(r.site_engine[0]), r.engine


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", list(TYPE_A))
def test_positively_homogeneous_activations_are_type_a_engines(name: str, scale: float) -> None:
    assert engine_of(TYPE_A[name], scale) == ("A", "A")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", list(TYPE_B))
def test_saturating_and_smooth_activations_are_type_b_engines(name: str, scale: float) -> None:
    assert engine_of(TYPE_B[name], scale) == ("B", "B")


def test_a_network_is_type_a_only_when_all_its_sites_are() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh())
    monitor = Monitor(model, every=1)
    model(torch.randn(128, 16))
    monitor.step(None)
    r = monitor.latest()
    monitor.close()
    assert list(r.site_engine) == ["A", "B"] and r.engine == "B"
