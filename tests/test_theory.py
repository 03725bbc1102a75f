"""The reference tables of docs/science.md section 7, and the product measured against them.

The temperature proofs train the linear model with a real `Monitor` through
`theory_cli.simulate`, the code path of `thermoscope theory --simulate`, and compare what the
Monitor read with the prediction. The prediction is an expectation over init draws and one run
sees one draw, so its measured T scatters by O(1/sqrt(d)) (docs/science.md section 7): the sizes below are
chosen to keep that scatter well inside the tolerance. Over seeds 0-5 (or 0-7), the
spread (standard deviation) of the relative error at these sizes was 1.1-1.7 % for MSE (d = 2000,
N = 20000), 0.9-2 % for MAE and 1.4-2.1 % for cross-entropy (d = 1000, N = 10000), none beyond
2.9 %, 4 % and 4.7 % respectively. At d = 200-500 single runs scatter by 5-10 %.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from thermoscope.cli import theory as theory_cli
from thermoscope.science import physics, theory

from helpers.processes import thermoscope

REQUIRED = ("energy_type_i", "delta_energy", "entropy_type_i", "entropy_type_ii", "temperature")


# -- entropies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.01, 1.0, 7.0])
def test_init_entropies_match_their_reference_values(scale: float) -> None:
    a = scale * math.sqrt(3.0)
    assert theory.init_entropy("normal", scale) == pytest.approx(
        0.5 * math.log(2 * math.pi * math.e * scale**2)
    )
    assert theory.init_entropy("uniform", scale) == pytest.approx(math.log(2 * a))
    # the uniform init's negentropy: the gap between the gaussian estimator and its exact entropy
    gap = theory.init_entropy("normal", scale) - theory.init_entropy("uniform", scale)
    assert gap == pytest.approx(0.1765, abs=1e-4)
    # entropy shifts by ln(scale) under scaling, for the numerically integrated mixture too
    assert theory.init_entropy("mixed", scale) - theory.init_entropy("mixed", 1.0) == pytest.approx(
        math.log(scale), abs=1e-12
    )


def test_mixed_init_entropy_matches_a_monte_carlo_estimate() -> None:
    """-E[ln p(w)] over 2e6 draws (standard error 4e-4 nats) against the numerical integral."""
    w = theory.draw_init("mixed", 1.0, 2_000_000, np.random.default_rng(5))
    m = 1.0 / math.sqrt(2.0)
    log_p = np.logaddexp(-0.5 * ((w - m) / m) ** 2, -0.5 * ((w + m) / m) ** 2) - math.log(
        2 * math.sqrt(2 * math.pi) * m
    )
    assert theory.init_entropy("mixed", 1.0) == pytest.approx(-log_p.mean(), abs=2e-3)
    # bimodal, so strictly below the gaussian bound of its variance
    assert theory.init_entropy("mixed", 1.0) < theory.init_entropy("normal", 1.0) - 5e-3


@pytest.mark.parametrize("init", theory.INITS)
def test_every_init_has_mean_zero_and_variance_scale_squared(init: str) -> None:
    w = theory.draw_init(init, 0.3, 1_000_000, np.random.default_rng(1))
    assert w.mean() == pytest.approx(0.0, abs=1.5e-3)
    assert w.var() == pytest.approx(0.09, rel=5e-3)


# -- energies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, 0.01, 0.3, 1.0, 3.0, 10.0, 100.0, 1000.0])
def test_expected_softplus_is_accurate_at_every_width(sigma: float) -> None:
    """Against a brute-force trapezoid on a grid fine enough to resolve the kink at every sigma."""
    z = np.linspace(-12.0, 12.0, 4_000_001)
    phi = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    truth = np.trapezoid(np.logaddexp(0.0, sigma * z) * phi, z)
    assert theory.expected_softplus(np.array([sigma]))[0] == pytest.approx(truth, rel=1e-9)


def test_folded_normal_mean_has_its_limits() -> None:
    assert theory.folded_normal_mean(np.array([0.0]), np.array([2.0]))[0] == pytest.approx(
        2.0 * math.sqrt(2 / math.pi)
    )
    assert theory.folded_normal_mean(np.array([-50.0]), np.array([1.0]))[0] == pytest.approx(50.0)


@pytest.mark.parametrize("init", theory.INITS)
@pytest.mark.parametrize("loss", theory.LOSSES)
def test_closed_form_type_i_energy_matches_a_monte_carlo_average_over_inits(loss: str, init: str) -> None:
    """The mean loss over 4000 init draws (standard error ~0.1 %) within 2 % of E_I."""
    scale, target = (0.1, 0.05) if loss == "ce" else (0.3, 1.0)
    problem = theory.Problem(loss=loss, init=init, scale=scale, target_scale=target, dim=100, samples=2000)
    data = theory.make_data(problem)
    draws = theory.draw_init(init, scale, problem.dim, theory.init_rng(7), draws=4000)
    mc = theory.energy(loss, data.x, data.y, draws.T)
    assert theory.predict(problem, data).energy_type_i == pytest.approx(mc.mean(), rel=0.02)


def test_mse_delta_energy_is_theorys_closed_form() -> None:
    """Delta E = ||X w*||^2 / N + s^2 tr(X^T X) / N (docs/science.md section 7)."""
    problem = theory.Problem(loss="mse", scale=0.5, target_scale=1.0, dim=50, samples=400)
    data = theory.make_data(problem)
    p = theory.predict(problem, data)
    n = problem.samples
    closed = np.sum((data.x @ p.w_star) ** 2) / n + 0.25 * np.sum(data.x**2) / n
    assert p.delta_energy == pytest.approx(closed, rel=1e-12)
    assert p.energy_type_ii == 0.0


def test_separable_labels_have_no_cross_entropy_optimum() -> None:
    problem = theory.Problem(loss="ce", target_scale=10.0, dim=50, samples=200)
    with pytest.raises(theory.ProblemError, match="separable"):
        theory.predict(problem)


# -- temperatures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "target"), [(1.0, 0.1), (0.1, 1.0)])
def test_exact_mse_temperature_approaches_the_asymptotic_formula_as_n_and_d_grow(
    scale: float, target: float
) -> None:
    """The gap shrinks like 1/sqrt(d) (the teacher's sample variance and the data's norms converge).

    Mean |relative gap| over four data seeds, at N = 10 d.
    """
    asymptotic = theory.asymptotic_mse_temperature(scale, target)
    assert (asymptotic > 0) == (scale > target)
    gaps = []
    for dim in (20, 200, 1000):
        temps = [
            theory.predict(theory.Problem("mse", "normal", scale, target, dim, 10 * dim, seed)).temperature
            for seed in range(4)
        ]
        gaps.append(np.mean([abs(t / asymptotic - 1) for t in temps]))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < (0.015 if scale > target else 0.05)


# (loss, init, scale, target scale, d, N, tolerance); scale < target scale is a negative T
GRID = [
    ("mse", "normal", 2.0, 1.0, 2000, 20000, 0.05),
    ("mse", "normal", 0.05, 0.2, 2000, 20000, 0.05),
    ("mse", "uniform", 0.3, 0.1, 2000, 20000, 0.05),
    ("mse", "uniform", 0.25, 1.0, 2000, 20000, 0.05),
    ("mae", "normal", 2.0, 1.0, 1000, 10000, 0.10),
    ("mae", "normal", 0.25, 1.0, 1000, 10000, 0.10),
    ("mae", "uniform", 0.25, 1.0, 1000, 10000, 0.10),
    ("mae", "mixed", 2.0, 1.0, 1000, 10000, 0.10),
    ("ce", "normal", 0.1, 0.03, 1000, 10000, 0.10),
    ("ce", "normal", 0.01, 0.05, 1000, 10000, 0.10),
    ("ce", "mixed", 0.1, 0.03, 1000, 10000, 0.10),
    ("ce", "uniform", 0.01, 0.05, 1000, 10000, 0.10),
]


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "init", "scale", "target", "dim", "samples", "tolerance"), GRID)
def test_monitored_training_reproduces_the_predicted_transition_temperature(
    loss: str, init: str, scale: float, target: float, dim: int, samples: int, tolerance: float
) -> None:
    problem = theory.Problem(loss, init, scale, target, dim, samples, seed=0)
    data = theory.make_data(problem)
    predicted = theory.predict(problem, data)
    measured = theory_cli.simulate(problem, data)

    assert measured.converged
    # it trained to the predicted w*, so S_II is the predicted one: the scatter is the init draw's
    assert np.linalg.norm(measured.weights - predicted.w_star) <= 1e-3 * np.linalg.norm(predicted.w_star)
    assert measured.entropy_type_ii == pytest.approx(predicted.entropy_type_ii, abs=1e-3 * dim)
    assert np.sign(measured.temperature) == np.sign(predicted.temperature) == np.sign(scale - target)
    assert measured.temperature == pytest.approx(predicted.temperature, rel=tolerance)


def test_measured_entropies_are_the_monitors_gaussian_estimator() -> None:
    """The Monitor's S at the init is d/2 ln(2 pi e var(w0)) of the very draw the run started from."""
    problem = theory.Problem("mse", "uniform", 0.3, 0.1, 200, 2000, seed=3)
    measured = theory_cli.simulate(problem)
    w0 = theory.draw_init("uniform", 0.3, 200, theory.init_rng(3)).astype(np.float32)
    assert measured.entropy_type_i == pytest.approx(theory.gaussian_total_entropy(w0), abs=1e-3)
    assert measured.entropy_type_i == pytest.approx(200 * physics.gaussian_entropy(w0.var()), abs=1e-3)


# -- the command ------------------------------------------------------------------------------------


def test_theory_json_prints_the_predicted_quantities() -> None:
    result = thermoscope(
        "theory", "--loss", "mae", "--init", "mixed", "--dim", "100", "--samples", "500", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(REQUIRED) <= set(out["predicted"])
    assert all(isinstance(out["predicted"][k], float) for k in REQUIRED)
    assert out["measured"] is None and out["relative_error"] is None


@pytest.mark.slow
def test_theory_simulate_json_prints_predicted_measured_and_relative_error() -> None:
    result = thermoscope(
        "theory", "--loss", "ce", "--init", "uniform", "--scale", "0.2", "--target-scale", "0.1",
        "--dim", "100", "--samples", "2000", "--simulate", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # exactly one JSON object: the progress display went to stderr
    for part in ("predicted", "measured", "relative_error"):
        assert set(REQUIRED) <= set(out[part]), part
    for key in REQUIRED:
        predicted, measured = out["predicted"][key], out["measured"][key]
        assert out["relative_error"][key] == pytest.approx((measured - predicted) / abs(predicted))
    assert out["simulation"]["converged"]


@pytest.mark.slow
def test_theory_table_shows_predicted_beside_measured() -> None:
    result = thermoscope("theory", "--dim", "100", "--samples", "1000", "--simulate")
    assert result.returncode == 0, result.stderr
    for text in ("predicted", "measured", "rel. error", "T_{I->II}", "T asymptotic", "converged"):
        assert text in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scale", "-1"], "--scale: must be a positive number, got -1"),
        (["--target-scale", "nan"], "--target-scale: must be a positive number, got nan"),
        (["--dim", "0"], "--dim: must be at least 1, got 0"),
        (["--seed", "-2"], "--seed: must be at least 0, got -2"),
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--dim", "100", "--samples", "50"], "samples must be at least 100 for loss mse with dim 100"),
        (["--loss", "ce", "--dim", "100", "--samples", "150"], "samples must be at least 201 for loss ce"),
        (["--loss", "ce", "--target-scale", "10", "--dim", "50", "--samples", "200"], "linearly separable"),
    ],
)
def test_bad_theory_arguments_get_a_clear_error(args: list[str], message: str) -> None:
    result = thermoscope("theory", *args, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
