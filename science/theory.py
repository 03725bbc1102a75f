"""Reference tables: the closed forms of docs/science.md section 7 for a linear model.

A linear model f(x) = w.x (no bias) is the one network whose Type I -> Type II transition can
be predicted on paper, so it is the yardstick for the whole measurement chain: train it with a
real `Monitor` attached and the measured energies, entropies and transition temperature must
land on the numbers computed here (`thermoscope theory --simulate`, tests/test_theory.py).

The problem (`Problem`, `make_data`):

* data X (N x d) with rows x ~ N(0, I_d) and a teacher beta with beta_i ~ N(0, b^2);
* `mse` and `mae`: noiseless targets y = X beta; `ce`: labels y in {-1, +1} with
  P(y = +1) = sigmoid(x.beta) (a logistic teacher, so that the trained w* is finite) and the
  loss mean softplus(-y x.w). MSE and MAE are torch's `mse_loss` and `l1_loss` (means, no 1/2);
* Type I: w_i i.i.d. with mean 0 and variance s^2 (`scale` s is the init's standard deviation
  for every init): `normal` N(0, s^2); `uniform` U(-a, a), a = s sqrt(3); `mixed` the equal
  two-component mixture N(+s/sqrt2, s^2/2) and N(-s/sqrt2, s^2/2), bimodal, total variance s^2;
* Type II: the trained optimum w*.

What is exact and what is not (`Prediction.basis` says so per quantity):

* Energies are expectations over the init draw, conditional on the data. MSE: E_I exact for
  every init. MAE: exact (folded-normal means) for the normal init, the CLT normal for the others
  (asymptotic in d). CE: quadrature for the normal init (exact to ~1e-12 relative), the CLT normal
  for the others.
* w*: with noiseless y = X beta and N >= d, X has full column rank almost surely, so the loss 0 is
  attained only at beta: w* = beta exactly, for MSE (least squares) and MAE (least absolute
  deviations) alike, and E_II = 0. CE: the logistic maximum-likelihood estimate, by Newton's
  method in float64 (converged to a Newton decrement below 1e-20).
* Entropies are totals over the d weights in nats, with the estimator the Monitor uses (the
  gaussian one, docs/science.md section 3): S_I = d 1/2 ln(2 pi e s^2) for *every* init of variance s^2,
  S_II = d 1/2 ln(2 pi e var(w*)) with var the population variance of w*'s entries. The init's
  exact differential entropy d h(p0), which a histogram estimator converges to, is reported
  beside it as `entropy_type_i_exact` (mixed init: numerical integration, error < 1e-9 nats per
  value).
* T_{I->II} = Delta E / (S_I - S_II), in loss units per nat. S_I - S_II = d/2 ln(s^2 / var(w*)),
  so T < 0 when the init is narrower than the trained weights.

These are the *expected* values over initializations; one run sees one init draw and scatters
around them by O(1/sqrt(d)) (docs/science.md section 7), which is why the tests use large d.

numpy only: the collector side imports this without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from numpy.polynomial.legendre import leggauss

from . import physics

LOSSES = ("mse", "mae", "ce")
INITS = ("normal", "uniform", "mixed")

#: The quantities every prediction and measurement carries (the CLI's JSON keys).
QUANTITIES = (
    "energy_type_i",
    "energy_type_ii",
    "delta_energy",
    "entropy_type_i",
    "entropy_type_ii",
    "delta_entropy",
    "temperature",
)

_SQRT_2PI = math.sqrt(2.0 * math.pi)


class ProblemError(ValueError):
    """Arguments that define no problem with a finite, unique optimum (the CLI exits 2)."""


@dataclass(frozen=True)
class Problem:
    """One linear-model transition: loss, init, init scale s, teacher scale b, d, N, seed."""

    loss: str = "mse"
    init: str = "normal"
    scale: float = 0.1
    target_scale: float = 0.05
    dim: int = 1000
    samples: int = 10000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ProblemError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.init not in INITS:
            raise ProblemError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in ("scale", "target_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ProblemError(f"{name} must be a positive number, got {value}")
        if self.dim < 1:
            raise ProblemError(f"dim must be at least 1, got {self.dim}")
        if self.seed < 0:
            raise ProblemError(f"seed must be at least 0, got {self.seed}")
        # N >= d makes X full-rank (a.s.), hence w* unique. With N < 2d points in general
        # position any labels are separable with probability -> 1 (Cover 1965), so the
        # logistic MLE does not exist whatever the teacher (Sur and Candes 2019).
        least = 2 * self.dim + 1 if self.loss == "ce" else self.dim
        if self.samples < least:
            if self.loss == "ce":
                why = "the logistic MLE needs more than 2 samples per weight"
            else:
                why = "the optimum is unique only with at least one sample per weight"
            raise ProblemError(
                f"samples must be at least {least} for loss {self.loss} with dim {self.dim} "
                f"({why}), got {self.samples}"
            )


@dataclass(frozen=True)
class Data:
    """The training set and the teacher that made it (float64)."""

    x: np.ndarray  # (N, d)
    y: np.ndarray  # (N,): targets (mse, mae) or labels in {-1, +1} (ce)
    beta: np.ndarray  # (d,)


@dataclass(frozen=True)
class Prediction:
    """Section 7's values for one problem and data set (energies in loss units, entropies in nats)."""

    energy_type_i: float
    energy_type_ii: float
    delta_energy: float
    entropy_type_i: float  # gaussian estimator, as measured
    entropy_type_i_exact: float  # d h(p0): what a histogram estimator converges to
    entropy_type_ii: float
    delta_entropy: float
    temperature: float
    temperature_asymptotic: float  # MSE's large-(N, d) limit; NaN for the other losses
    w_star: np.ndarray = field(repr=False)
    basis: dict[str, str] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """The scalar quantities by name (QUANTITIES first)."""
        names = (*QUANTITIES, "entropy_type_i_exact", "temperature_asymptotic")
        return {name: float(getattr(self, name)) for name in names}


# -- data and initializations ----------------------------------------------------------------------


def make_data(problem: Problem) -> Data:
    """X, the teacher beta and the targets, all from `problem.seed` (the init uses another stream)."""
    rng = np.random.default_rng([problem.seed, 0])
    x = rng.standard_normal((problem.samples, problem.dim))
    beta = rng.normal(0.0, problem.target_scale, problem.dim)
    margin = x @ beta
    if problem.loss == "ce":
        y = np.where(rng.random(problem.samples) < _sigmoid(margin), 1.0, -1.0)
    else:
        y = margin
    return Data(x=x, y=y, beta=beta)


def init_rng(seed: int) -> np.random.Generator:
    """The generator of the init draw, independent of the data's."""
    return np.random.default_rng([seed, 1])


def draw_init(
    init: str, scale: float, dim: int, rng: np.random.Generator, draws: int | None = None
) -> np.ndarray:
    """Initial weights of mean 0 and variance scale^2: shape (dim,), or (draws, dim)."""
    shape = (dim,) if draws is None else (draws, dim)
    if init == "normal":
        return rng.normal(0.0, scale, shape)
    if init == "uniform":
        a = scale * math.sqrt(3.0)
        return rng.uniform(-a, a, shape)
    if init == "mixed":
        half = scale / math.sqrt(2.0)
        return np.where(rng.random(shape) < 0.5, half, -half) + rng.normal(0.0, half, shape)
    raise ValueError(f"unknown init {init!r}")


def init_entropy(init: str, scale: float) -> float:
    """Exact differential entropy h(p0) of one initial weight (nats per value)."""
    if init == "normal":
        return float(physics.gaussian_entropy(scale * scale))
    if init == "uniform":
        return math.log(2.0 * math.sqrt(3.0) * scale)
    if init == "mixed":
        return _mixed_unit_entropy() + math.log(scale)
    raise ValueError(f"unknown init {init!r}")


@cache
def _mixed_unit_entropy() -> float:
    """h of the unit-variance mixture 1/2 N(m, m^2) + 1/2 N(-m, m^2), m = 1/sqrt2.

    The trapezoid rule on a smooth integrand with Gaussian tails converges geometrically: with
    spacing 1e-3 over +- (m + 14 m) it agrees with spacing 2e-3 to 1e-15; the cut tails hold
    less than 1e-40 of the mass. So the value is exact to well under 1e-9 nats.
    """
    m = 1.0 / math.sqrt(2.0)
    x = np.arange(-15 * m, 15 * m + 5e-4, 1e-3)
    log_p = np.logaddexp(-0.5 * ((x - m) / m) ** 2, -0.5 * ((x + m) / m) ** 2) - math.log(2 * _SQRT_2PI * m)
    return float(np.trapezoid(-np.exp(log_p) * log_p, x))


# -- energies ------------------------------------------------------------------------------------


def energy(loss: str, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray | float:
    """The training loss of weights w (d,) -> float, or of many, w (d, K) -> (K,)."""
    u = x @ w
    yy = y if u.ndim == 1 else y[:, None]
    if loss == "mse":
        values = np.mean((u - yy) ** 2, axis=0)
    elif loss == "mae":
        values = np.mean(np.abs(u - yy), axis=0)
    elif loss == "ce":
        values = np.mean(np.logaddexp(0.0, -yy * u), axis=0)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    return float(values) if u.ndim == 1 else values


def energy_type_i(loss: str, scale: float, x: np.ndarray, y: np.ndarray) -> float:
    """E_I = E_w[loss(w)] over inits of mean 0 and variance scale^2 (the normal-init form).

    u_i = x_i.w has mean 0 and variance s^2 ||x_i||^2: normal for the normal init, and by the
    CLT over the d weights for the others. MSE needs only those two moments, so it is exact
    for any init.
    """
    sq_norms = np.einsum("ij,ij->i", x, x)
    if loss == "mse":
        return float(np.mean(y * y) + scale * scale * sq_norms.mean())
    sigma = scale * np.sqrt(sq_norms)
    if loss == "mae":
        return float(np.mean(folded_normal_mean(-y, sigma)))
    if loss == "ce":
        return float(np.mean(expected_softplus(sigma)))
    raise ValueError(f"unknown loss {loss!r}")


_erf = np.vectorize(math.erf, otypes=[float])


def folded_normal_mean(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E|Z| for Z ~ N(mu, sigma^2): sigma sqrt(2/pi) exp(-mu^2 / 2 sigma^2) + mu erf(mu / sigma sqrt2)."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    z = mu / sigma
    return sigma * math.sqrt(2.0 / math.pi) * np.exp(-0.5 * z * z) + mu * _erf(z / math.sqrt(2.0))


@cache
def _half_line_rule(nodes: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1]."""
    t, w = leggauss(nodes)
    return (t + 1.0) / 2.0, w / 2.0


def expected_softplus(sigma: np.ndarray) -> np.ndarray:
    """E[softplus(sigma Z)], Z ~ N(0, 1), to ~1e-12 relative for any sigma >= 0.

    Gauss-Hermite quadrature is the usual choice. Applied to softplus(sigma z) directly it is exact
    to 1e-13 for sigma <= 1 but loses accuracy once the kink of width 1/sigma is narrower than its
    node spacing (150 nodes: 2e-5 relative at sigma = 10, 3e-3 at sigma = 100), and sigma is
    s ||x|| ~ s sqrt(d) here. So the part that makes the kink is integrated exactly:
    softplus(u) = max(u, 0) + log1p(exp(-|u|)), E[max(sigma Z, 0)] = sigma / sqrt(2 pi), and the
    smooth remainder is 2/sigma int_0^inf log1p(e^-t) phi(t/sigma) dt, by Gauss-Legendre in
    t on [0, min(60, 12 sigma)] (beyond it the integrand is below 1e-26).
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    flat = sigma.reshape(-1)
    out = np.full(flat.shape, math.log(2.0))
    pos = flat > 0
    s = flat[pos][:, None]
    t01, w01 = _half_line_rule()
    span = np.minimum(60.0, 12.0 * s)
    t = span * t01
    integrand = span * w01 * np.log1p(np.exp(-t)) * np.exp(-0.5 * (t / s) ** 2)
    remainder = 2.0 * integrand.sum(axis=1) / s[:, 0]
    out[pos] = (s[:, 0] + remainder) / _SQRT_2PI
    return out.reshape(sigma.shape)


# -- the trained state ---------------------------------------------------------------------------


def _sigmoid(u: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -u))


def logistic_mle(x: np.ndarray, y: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """argmin_w mean softplus(-y x.w), by damped Newton in float64.

    Raises ProblemError when the labels are (nearly) linearly separable: the likelihood then
    has no finite maximizer and the iterates run off to infinity.
    """
    n, d = x.shape
    w = np.zeros(d)
    value = math.log(2.0)
    for _ in range(max_iter):
        margin = y * (x @ w)
        p = _sigmoid(-margin)  # d softplus(-m) / d(-m)
        grad = -(x.T @ (y * p)) / n
        root = x * np.sqrt(p * (1.0 - p))[:, None]
        hess = root.T @ root / n  # a Gram matrix: numpy hands it to BLAS syrk
        try:
            step = np.linalg.solve(hess, -grad)
        except np.linalg.LinAlgError:
            break
        decrement = float(-grad @ step)
        if decrement < 1e-20:
            return w
        t = 1.0
        while True:
            candidate = w + t * step
            new = float(np.mean(np.logaddexp(0.0, -y * (x @ candidate))))
            if new <= value - 0.25 * t * decrement or t < 1e-10:
                break
            t *= 0.5
        w, value = candidate, new
        if value < 1e-6 or np.max(np.abs(x @ w)) > 200.0:
            break
    raise ProblemError(
        "the labels are (nearly) linearly separable: cross-entropy has no finite optimum "
        "(lower --target-scale or raise --samples)"
    )


def optimum(loss: str, data: Data) -> np.ndarray:
    """The trained weights w* (see the module docstring for why beta is exact for mse and mae)."""
    if loss in ("mse", "mae"):
        return data.beta.copy()
    return logistic_mle(data.x, data.y)


def gaussian_total_entropy(w: np.ndarray) -> float:
    """d h_est(w): the Monitor's gaussian estimator (population variance, same floors)."""
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    mean = float(w.mean())
    m2 = float(((w - mean) ** 2).sum())
    return float(physics.layer_entropy(np.array([w.size]), np.array([mean]), np.array([m2]))[0])


# -- the tables ----------------------------------------------------------------------------------


def asymptotic_mse_temperature(scale: float, target_scale: float) -> float:
    """T -> 2 (b^2 + s^2) / ln(s^2 / b^2) for MSE at large N and d (docs/science.md section 7).

    Delta E -> d (b^2 + s^2) (||X beta||^2 / N -> ||beta||^2 -> d b^2, tr(X^T X)/N -> d) and
    Delta S -> d/2 ln(s^2 / b^2). It needs N and d large, not N >> d: with noiseless targets
    w* = beta for any N >= d. Infinite at s = b (no entropy change).
    """
    s2, b2 = scale * scale, target_scale * target_scale
    log_ratio = math.log(s2 / b2)
    return 2.0 * (b2 + s2) / log_ratio if log_ratio != 0.0 else math.inf


def predict(problem: Problem, data: Data | None = None) -> Prediction:
    """Section 7's expected Type I / Type II values and T_{I->II} for `problem`."""
    data = data if data is not None else make_data(problem)
    d, s = problem.dim, problem.scale
    e_i = energy_type_i(problem.loss, s, data.x, data.y)
    w_star = optimum(problem.loss, data)
    e_ii = 0.0 if problem.loss in ("mse", "mae") else float(energy(problem.loss, data.x, data.y, w_star))
    delta_e = e_i - e_ii
    s_i = d * float(physics.gaussian_entropy(s * s))
    s_ii = gaussian_total_entropy(w_star)
    delta_s = s_i - s_ii
    temp = delta_e / delta_s if delta_s != 0.0 else math.nan
    asymptotic = asymptotic_mse_temperature(s, problem.target_scale) if problem.loss == "mse" else math.nan
    normal = problem.init == "normal"
    e_basis = {
        "mse": "exact, any init",
        "mae": "exact (folded normal)" if normal else "asymptotic in d (CLT)",
        "ce": "quadrature, 1e-12" if normal else "asymptotic in d (CLT), quadrature",
    }[problem.loss]
    optimum_basis = "exact: w* = beta" if problem.loss != "ce" else "Newton MLE, float64"
    basis = {
        "energy_type_i": e_basis,
        "energy_type_ii": optimum_basis,
        "entropy_type_i": "estimator at variance s^2",
        "entropy_type_i_exact": "numerical, < 1e-9 per value" if problem.init == "mixed" else "exact",
        "entropy_type_ii": "estimator of w*",
        "temperature_asymptotic": "large N and d" if problem.loss == "mse" else "none",
    }
    return Prediction(
        energy_type_i=e_i,
        energy_type_ii=e_ii,
        delta_energy=delta_e,
        entropy_type_i=s_i,
        entropy_type_i_exact=d * init_entropy(problem.init, s),
        entropy_type_ii=s_ii,
        delta_entropy=delta_s,
        temperature=temp,
        temperature_asymptotic=asymptotic,
        w_star=w_star,
        basis=basis,
    )
