"""The formulas of docs/science.md against their reference values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thermoscope.science import physics

RNG = np.random.default_rng(0)
N = 1_000_000


def moments(x: np.ndarray) -> tuple[int, float, float]:
    mean = float(x.mean())
    return x.size, mean, float(((x - mean) ** 2).sum())


@pytest.mark.parametrize("s", [0.01, 1.0, 30.0])
def test_gaussian_entropy_of_normal_values_is_half_log_2_pi_e_variance(s: float) -> None:
    n, mean, m2 = moments(RNG.normal(0.0, s, N))
    h = physics.layer_entropy(np.array([n]), np.array([mean]), np.array([m2]))[0] / n
    assert h == pytest.approx(0.5 * math.log(2 * math.pi * math.e * s * s), abs=2e-3)


def test_gaussian_entropy_is_the_max_entropy_bound_above_uniform_and_laplace() -> None:
    a, b = 1.0, 1.0
    for x, exact in ((RNG.uniform(-a, a, N), math.log(2 * a)), (RNG.laplace(0, b, N), 1 + math.log(2 * b))):
        n, _, m2 = moments(x)
        assert physics.gaussian_entropy(m2 / n) > exact


def test_constant_layer_has_a_finite_floored_entropy() -> None:
    zeros = physics.layer_entropy(np.array([1000]), np.array([0.0]), np.array([0.0]))
    ones = physics.layer_entropy(np.array([1000]), np.array([1.0]), np.array([0.0]))
    assert np.isfinite(zeros).all() and np.isfinite(ones).all()
    assert ones[0] / 1000 == pytest.approx(0.5 * (physics.LN_2PI_E + math.log(2.0**-48)))


@pytest.mark.parametrize("k", [2, 3, 7])
def test_shards_merge_exactly_to_the_whole_tensor(k: int) -> None:
    x = RNG.normal(0.3, 2.0, 10_001)
    cuts = np.sort(RNG.choice(np.arange(1, x.size), k - 1, replace=False))
    parts = [moments(p) for p in np.split(x, cuts)]
    whole = moments(x)

    merged = parts[0]  # one shard at a time, as shards arrive: merging merged parts stays exact
    for part in parts[1:]:
        cols = np.array([merged, part]).T
        merged = tuple(float(c[0]) for c in physics.merge_moments_grouped(np.zeros(2, dtype=int), *cols, 1))
    assert merged == pytest.approx(whole, rel=1e-12)

    cols = np.array(parts).T
    grouped = physics.merge_moments_grouped(np.zeros(k, dtype=int), cols[0], cols[1], cols[2], 1)
    assert [float(c[0]) for c in grouped] == pytest.approx(whole, rel=1e-12)


def test_grouped_merge_keeps_groups_apart() -> None:
    a, b = RNG.normal(0, 1, 500), RNG.normal(5, 3, 700)
    parts = [moments(a[:200]), moments(b[:100]), moments(a[200:]), moments(b[100:])]
    cols = np.array(parts).T
    n, mean, m2 = physics.merge_moments_grouped(np.array([0, 1, 0, 1]), cols[0], cols[1], cols[2], 2)
    assert (n[0], mean[0], m2[0]) == pytest.approx(moments(a), rel=1e-12)
    assert (n[1], mean[1], m2[1]) == pytest.approx(moments(b), rel=1e-12)


def test_temperature_is_de_over_ds_and_can_be_negative() -> None:
    beta, t = physics.temperature(np.array([2.0, 2.0]), np.array([-0.5, 0.5]), 1e-6, 1e-9)
    assert beta == pytest.approx([-4.0, 4.0])
    assert t == pytest.approx([-0.25, 0.25])


def test_temperature_is_undefined_below_the_noise_floor_but_beta_stays_finite() -> None:
    # entropy change below its floor; energy change below its floor; both resolved
    beta, t = physics.temperature(np.array([1e-9, 3.0, 3.0]), np.array([1.0, 0.0, 1.0]), 1e-6, 1e-3)
    assert np.isnan(t[:2]).all() and t[2] == pytest.approx(1 / 3)
    assert np.isfinite(beta).all()
    assert beta[1] == pytest.approx(3.0 / 1e-3)  # saturates at dS / floor


def test_slope_recovers_a_line_and_its_noise() -> None:
    x = np.arange(50.0)
    y = 3.0 - 0.2 * x + RNG.normal(0, 0.5, 50)
    b, se = physics.slope(x, y)
    assert b == pytest.approx(-0.2, abs=4 * se)
    expected_se = 0.5 / math.sqrt(((x - x.mean()) ** 2).sum())  # 0.0049
    assert expected_se / 1.5 < se < expected_se * 1.5


def gaussian_eta(phi, tau: float) -> float:
    z = RNG.normal(0.0, math.sqrt(tau), N)
    return float(physics.site_efficiency(z.var(), phi(z).var()))


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("tau", [1e-3, 1.0, 1e3])
def test_relu_efficiency_is_the_same_at_every_input_temperature(tau: float) -> None:
    assert gaussian_eta(lambda z: np.maximum(z, 0), tau) == pytest.approx(0.5 + 1 / (2 * math.pi), abs=3e-3)


def test_identity_does_no_work() -> None:
    assert gaussian_eta(lambda z: z, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_tanh_efficiency_goes_from_zero_to_one_with_temperature() -> None:
    assert gaussian_eta(np.tanh, 1e-4) == pytest.approx(0.0, abs=1e-3)
    assert gaussian_eta(np.tanh, 1.0) == pytest.approx(0.606, abs=5e-3)
    assert gaussian_eta(np.tanh, 1e4) == pytest.approx(1.0, abs=2e-2)


def test_sigmoid_efficiency_goes_from_fifteen_sixteenths_to_one() -> None:
    assert gaussian_eta(sigmoid, 1e-4) == pytest.approx(15 / 16, abs=1e-3)
    assert gaussian_eta(sigmoid, 1e4) == pytest.approx(1.0, abs=2e-2)


def test_the_sites_efficiencies_are_reported_as_a_distribution_that_does_not_saturate() -> None:
    """48 sites at 0.3 made 1 - prod(1 - eta) = 1 - 4e-8: the distribution reads 0.3; a negative
    efficiency (a site amplifying its input) stays in it, and an undefined one is left out."""
    assert physics.efficiency_quantiles(np.full(48, 0.3)) == pytest.approx([0.3] * 5)
    eta = np.array([-0.2, 0.5, 0.6, math.nan, 0.9, 0.7])
    assert physics.efficiency_quantiles(eta) == pytest.approx([-0.2, 0.5, 0.6, 0.7, 0.9])
    assert np.isnan(physics.efficiency_quantiles(np.array([math.nan]))).all()


def test_beta_stays_finite_when_neither_entropy_nor_energy_moves() -> None:
    with np.errstate(all="raise"):  # no 0/0 on the way either
        beta, t = physics.temperature(np.array([0.0, 2.0]), np.array([0.0, 0.0]), 0.0, 0.0)
    assert np.isfinite(beta).all() and np.isnan(t).all()
