"""The formulas of docs/science.md, pure and vectorized over layers (numpy in, numpy out).

Everything here works on *sufficient statistics* (count, mean, M2, dot products), never on
raw tensors, so the same code serves one rank in-process and the collector after it has
merged ranks and shards. Units: entropy in nats, energy in loss units, temperature in loss
units per nat.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np

LN_2PI_E = math.log(2.0 * math.pi * math.e)

#: Smallest variance we take a layer to have, relative to its squared mean and absolute.
#: A constant tensor (zero biases, LayerNorm gains of one) has a degenerate distribution of
#: entropy -inf; float32 values cannot resolve a spread below ~2^-24 of their magnitude, so
#: that is where the entropy is floored (documented in the README).
VAR_FLOOR_REL = 2.0**-48
VAR_FLOOR_ABS = 1e-30

#: Entropy changes below this many nats per value are not resolvable from float32 moments.
ENTROPY_RESOLUTION = 1e-6
#: Layer work below this (loss units) is indistinguishable from float64 round-off.
WORK_RESOLUTION = 1e-12
#: Two-sided confidence of the tests that make a temperature defined: a change over the window is
#: significant when it is farther from 0 than the Student-t quantile of this confidence times its
#: standard error. Noise alone passes one such test about 1 - CONFIDENCE of the time.
CONFIDENCE = 0.95


def variance(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Population variance M2/count, floored at what float32 values can resolve."""
    count = np.asarray(count, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.asarray(m2, dtype=np.float64) / count
    floor = np.maximum(VAR_FLOOR_REL * mean * mean, VAR_FLOOR_ABS)
    return np.where(count > 0, np.maximum(var, floor), np.nan)


def at_floor(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Whether a layer's variance is at (or below) its floor: a constant tensor, such as a
    zero-initialized one (LoRA's B) or a unit gain. Its entropy is then the floor's, not a
    reading (-33 nats a value for a zero tensor), and climbing from it is no thermodynamics:
    such a layer has no entropy reading (NaN) and so no temperature (docs/science.md section 3)."""
    count = np.asarray(count, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.asarray(m2, dtype=np.float64) / count
    return (count > 0) & (var <= np.maximum(VAR_FLOOR_REL * mean * mean, VAR_FLOOR_ABS))


def gaussian_entropy(var: np.ndarray | float) -> np.ndarray:
    """Differential entropy per value of N(., var): 1/2 ln(2 pi e var) (nats)."""
    return 0.5 * (LN_2PI_E + np.log(np.asarray(var, dtype=np.float64)))


def layer_entropy(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """S_l = n_l * h_l with the gaussian estimator (nats)."""
    return np.asarray(count, dtype=np.float64) * gaussian_entropy(variance(count, mean, m2))


#: Histogram edges are the initial mean +- this many initial standard deviations (rounded out
#: to a coarse grid), wide enough for the spreading that training brings (values beyond are
#: counted as outside and reported).
EDGE_SIGMAS = 8.0
#: A constant initial tensor (zero bias, unit gain of a LayerNorm/RMSNorm/BatchNorm) has no
#: spread to size its edges by: they are then +- this many times max(|mean|, 1) around it, i.e.
#: [-0.5, 2.5] for a unit gain and [-1.5, 1.5] for a zero bias. Such tensors train to a spread of
#: their own: measured after 300 AdamW steps at lr 1e-2 on tiny GPT-2, Llama and ResNet models,
#: gains reached -0.01 to 1.23 (weight decay pulls them towards 0) and biases -0.68 to 0.50, which
#: the former +-5 % edges missed entirely (up to 100 % of a layer outside); 512 bins over 3 units
#: still resolve a spread of 0.01.
EDGE_FLOOR = 1.5


def histogram_edges(mean: float, std: float) -> tuple[float, float]:
    """Fixed edges [lo, hi) for a layer from its initial mean and standard deviation.

    A deterministic rule, so every replica computes the same edges; lo and hi are rounded
    outwards to a power-of-two grid so that float noise in the inputs cannot move them.
    """
    half = EDGE_SIGMAS * std if std > 0 else EDGE_FLOOR * max(abs(mean), 1.0)
    grid = 2.0 ** math.floor(math.log2(half / 8))
    return math.floor((mean - half) / grid) * grid, math.ceil((mean + half) / grid) * grid


#: A histogram entropy needs this many values per bin on average to mean something: with fewer
#: the plug-in estimate is biased low by about (occupied bins - 1) / (2 n). Layers with fewer
#: values (small biases) have no histogram entropy (NaN).
MIN_VALUES_PER_BIN = 4


def histogram_entropy(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """h = -sum p_i ln p_i + ln(bin width) per value, from counts (layers, bins + 2).

    Columns 0 and -1 hold the values below and above the edges: they are left out of p (the
    entropy is that of the values inside the edges) and reported by `outside_fraction`.
    """
    inside = np.asarray(counts, dtype=np.float64)[:, 1:-1]
    n = inside.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = inside / n
        plogp = np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        width = (np.asarray(hi, dtype=np.float64) - lo) / inside.shape[1]
        enough = n[:, 0] >= MIN_VALUES_PER_BIN * inside.shape[1]
        return np.where(enough, -plogp + np.log(width), np.nan)


def outside_fraction(counts: np.ndarray) -> np.ndarray:
    """Share of each layer's histogram subset that fell outside its edges."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (counts[:, 0] + counts[:, -1]) / counts.sum(axis=1)


def merge_moments_grouped(
    group: np.ndarray, count: np.ndarray, mean: np.ndarray, m2: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge many parts at once: part i goes into group[i] (of `size`); Chan's sum form.

    M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2, which is exact and order-free.
    """
    group = np.asarray(group, dtype=np.int64)
    count = np.asarray(count, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    total = np.bincount(group, count, size)
    # 0 for empty groups; dividing only where total > 0 needs no errstate (which costs as much as the rest)
    merged_mean = np.divide(
        np.bincount(group, count * mean, size), total, out=np.zeros(size), where=total > 0
    )
    spread = count * (mean - merged_mean[group]) ** 2
    return total, merged_mean, np.bincount(group, np.asarray(m2, dtype=np.float64) + spread, size)


def inverse_temperature(
    delta_s: np.ndarray, delta_e: np.ndarray, energy_floor: np.ndarray | float
) -> np.ndarray:
    """beta = dS/dE, always finite: |dE| is taken as at least the energy noise floor.

    Where the energy change is below its floor, beta saturates at dS/floor (a lower bound
    on |beta|); `temperature` then reports the temperature as undefined.
    """
    delta_s = np.asarray(delta_s, dtype=np.float64)
    delta_e = np.asarray(delta_e, dtype=np.float64)
    sign = np.where(delta_e < 0, -1.0, 1.0)
    # a flat, noiseless energy has a floor of 0; one with too few increments to estimate its noise, inf
    floor = np.maximum(np.where(np.isinf(energy_floor), 0.0, energy_floor), WORK_RESOLUTION)
    return delta_s / (sign * np.maximum(np.abs(delta_e), floor))


def temperature(
    delta_s: np.ndarray,
    delta_e: np.ndarray,
    entropy_floor: np.ndarray | float,
    energy_floor: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """(beta, T) with T = 1/beta where both changes exceed their floors, else NaN.

    The floors are what makes a change significant: the `Thermometer` passes the critical
    value of `CONFIDENCE` (`hac_critical`) times the change's standard error over the window (at least float
    resolution). NaN means "undefined": the entropy or the energy did not move significantly.
    Negative T is real: the entropy grew while the energy fell.
    """
    beta = inverse_temperature(delta_s, delta_e, energy_floor)
    resolved = (np.abs(delta_s) > entropy_floor) & (np.abs(delta_e) > energy_floor)
    with np.errstate(divide="ignore"):
        return beta, np.where(resolved, 1.0 / beta, np.nan)


@functools.lru_cache(maxsize=64)  # a thermometer asks for its window's one or two at every sample
def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student-t critical value for `dof` degrees of freedom (inf for dof < 1).

    Exact for 1 and 2 degrees of freedom; from 3 on the Cornish-Fisher expansion in 1/dof to its
    fourth order (Abramowitz & Stegun 26.7.5), within 0.2 % at 3 and 1e-4 from 5 on.
    """
    if dof < 1:
        return math.inf
    p = 0.5 + confidence / 2
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        a = 2 * p - 1
        return a * math.sqrt(2 / (1 - a * a))
    z = NormalDist().inv_cdf(p)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / dof ** (k + 1) for k, term in enumerate(terms))


def hac_lags(n: int) -> int:
    """The Newey-West bandwidth for `n` increments, fixed by `n` alone (never by the data):
    floor(4 (n/100)^(2/9)), the usual rule (2 lags at 10 increments, 3 at 50)."""
    return int(4.0 * (n / 100.0) ** (2.0 / 9.0))


#: Kiefer and Vogelsang's (2005) fixed-b 97.5 % quantile of a t-statistic with a Bartlett
#: (Newey-West) variance, as a cubic in b = (lags + 1) / n: z + 2.9694 b + 0.4160 b^2 - 0.5324 b^3.
FIXED_B_BARTLETT = (2.9694, 0.4160, -0.5324)


def hac_critical(n: int, dof: int, confidence: float = CONFIDENCE) -> float:
    """The critical value of a test whose standard error is Newey-West's over `n` terms with
    `hac_lags(n)` lags: the larger of Student's t at `dof` degrees of freedom and the fixed-b
    quantile (`FIXED_B_BARTLETT`, at `confidence`'s normal quantile) at b = (lags + 1) / n.

    With few terms a Newey-West variance is itself noisy and biased low; the normal or t quantile
    then under-covers (a simulated window of 9 AR(1) increments at phi 0.3: 86 % for a stated
    95 %), the fixed-b one does not (91-98 % for |phi| <= 0.3; tests/test_temperature.py)."""
    if n < 2:
        return math.inf
    b = (hac_lags(n) + 1) / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    c1, c2, c3 = FIXED_B_BARTLETT
    return max(t_quantile(dof, confidence), z + c1 * b + c2 * b * b + c3 * b**3)


def window_changes(
    x: np.ndarray, y: np.ndarray, steps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two series' changes over a window, with their HAC (Newey-West) (co)variances from their
    per-sample increments.

    `x`, `y` (n + 1, layers): the series at the window's samples, `steps` (n + 1,) their steps.
    Each increment d_i is read as a rate over its gap, d_i / gap_i (a sampled step's work stands
    for its whole gap, so its noise scales with the gap, not with its square root). The rates are
    autocorrelated (momentum, Adam's moments, a drifting mean), so their long-run (co)variance is
    Newey-West's: the lag-0 to lag-L sample autocovariances with Bartlett weights 1 - k/(L+1),
    L = `hac_lags(n)`, scaled by n/(n-1) (at L = 0 the plain sample variance). Returns
    (X, Y, Var X, Var Y, Cov(X, Y)) for the changes X = x_n - x_0 = sum d_i and Y likewise, the
    (co)variances being the long-run ones times sum gap_i^2; inf for n < 2 (no scatter to go by).
    Bartlett weights keep the variances non-negative and the pair's matrix positive semidefinite.
    """
    change_x, change_y = x[-1] - x[0], y[-1] - y[0]
    n = len(steps) - 1
    if n < 2:
        inf = np.full(change_x.shape, np.inf)
        return change_x, change_y, inf, inf, inf
    gaps = np.asarray(steps[1:] - steps[:-1], dtype=np.float64)
    per_step = (1.0 / gaps)[:, None]
    rx, ry = (x[1:] - x[:-1]) * per_step, (y[1:] - y[:-1]) * per_step
    rx -= np.add.reduce(rx, axis=0) / n
    ry -= np.add.reduce(ry, axis=0) / n
    xx, yy, xy = (np.add.reduce(a * b, axis=0) for a, b in ((rx, rx), (ry, ry), (rx, ry)))
    for k in range(1, min(hac_lags(n), n - 1) + 1):
        weight = 1.0 - k / (hac_lags(n) + 1.0)
        xx = xx + 2.0 * weight * np.add.reduce(rx[k:] * rx[:-k], axis=0)
        yy = yy + 2.0 * weight * np.add.reduce(ry[k:] * ry[:-k], axis=0)
        xy = xy + weight * np.add.reduce(rx[k:] * ry[:-k] + ry[k:] * rx[:-k], axis=0)
    scale = float(gaps @ gaps) / (n - 1)
    return change_x, change_y, xx * scale, yy * scale, xy * scale


def fieller(
    numerator: np.ndarray,
    denominator: np.ndarray,
    var_num: np.ndarray,
    var_den: np.ndarray,
    cov: np.ndarray,
    crit: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fieller's interval for the ratio numerator/denominator of two estimates with these
    (co)variances, at the critical value `crit`: the ratios rho with
    (numerator - rho denominator)^2 <= crit^2 Var(numerator - rho denominator).

    (low, high) where the set is a bounded interval, which is exactly where the denominator is
    significant (|denominator| > crit sd); NaN elsewhere (the set is then the whole line or two
    half-lines: the data bound no ratio). Unlike the delta method it stays honest when the
    denominator is barely significant: its interval then grows lopsided towards infinity."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    c2 = crit * crit
    a = den * den - c2 * var_den
    b = num * den - c2 * cov  # half the linear coefficient, with its sign flipped
    c = num * num - c2 * var_num
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(np.maximum(b * b - a * c, 0.0))
        low, high = (b - root) / a, (b + root) / a
    bounded = a > 0
    return np.where(bounded, low, np.nan), np.where(bounded, high, np.nan)


def temperature_stderr(
    delta_s: np.ndarray,
    delta_e: np.ndarray,
    var_s: np.ndarray,
    var_e: np.ndarray,
    cov: np.ndarray,
) -> np.ndarray:
    """Standard error of T = dE/dS by the delta method, from the changes' (co)variances:
    se(T) = |T| sqrt(Var E / dE^2 + Var S / dS^2 - 2 Cov / (dE dS)), for changes that are
    not 0 (where T is defined).

    The quadratic form is that of a (sample) covariance matrix, so it is never negative; it is
    clipped at 0 against round-off.
    """
    delta_s = np.asarray(delta_s, dtype=np.float64)
    rs, re = np.sqrt(var_s) / delta_s, np.sqrt(var_e) / delta_e  # relative standard errors
    rel = re * re + rs * rs - 2 * cov / (delta_e * delta_s)
    return np.abs(delta_e / delta_s) * np.sqrt(np.maximum(rel, 0.0))


def slope_covariance(x: np.ndarray, y1: np.ndarray, y2: np.ndarray) -> float:
    """HAC (Newey-West, `hac_lags(n)` lags) covariance of the least-squares slopes of y1 and y2
    against x, from their residuals (n - 2 degrees of freedom): the cross term of the job's
    temperature, whose two changes are slopes over the same window. With y1 = y2 it is the
    slope's HAC variance (`slope`'s standard error, squared)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if n < 3 or sxx == 0.0:
        return math.nan
    u1, u2 = (xc * (y - y.mean() - xc * ((xc @ y) / sxx)) for y in (np.asarray(y1), np.asarray(y2)))
    total = float(u1 @ u2)
    lags = hac_lags(n)
    for k in range(1, min(lags, n - 1) + 1):
        total += (1.0 - k / (lags + 1.0)) * float(u1[k:] @ u2[:-k] + u2[k:] @ u1[:-k])
    return total * n / (n - 2) / (sxx * sxx)


def site_variance(count: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """A site's population variance M2/count, unfloored (NaN where it made no values).

    The weights' floor (`variance`) is no site's: a site's moments are shifted (docs/science.md
    section 5), so a variance of 0 is a signal that did not spread at the values' precision,
    and a floored input made a ratio of round-off (an EfficientNet sigmoid read eta -8.9e14)."""
    count = np.asarray(count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, np.asarray(m2, dtype=np.float64) / count, np.nan)


def site_efficiency(var_in: np.ndarray, var_out: np.ndarray) -> np.ndarray:
    """eta = 1 - Var(a)/Var(z): the share of the input's thermal energy the site converts (NaN
    where the input did not spread: nothing to convert). Negative where the site amplifies the
    spread (GELU and SiLU have slopes above 1 in places): reported, never clipped."""
    var_in = np.asarray(var_in, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var_in > 0, 1.0 - np.asarray(var_out, dtype=np.float64) / var_in, np.nan)


#: The quantiles of the sites' efficiencies a reading reports: the extremes, the quartiles, the median.
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def efficiency_quantiles(eta: np.ndarray) -> np.ndarray:
    """The QUANTILES of the sites' efficiencies, over the sites with one (NaN where none has).

    In place of a network efficiency 1 - prod(1 - eta), which assumes a plain chain of sites:
    with residual paths and many sites it saturates at 1 (48 sites at 0.3: 1 - 4e-8) and says
    nothing. The distribution says what the sites do, the negative ones included."""
    eta = np.asarray(eta, dtype=np.float64)
    eta = eta[np.isfinite(eta)]
    if not eta.size:
        return np.full(len(QUANTILES), np.nan)
    return np.quantile(eta, QUANTILES)


#: A site is a scale-invariant (Type A) engine when its scale probe moves eta by at most this
#: much. For a positively homogeneous activation the probe is exact (scaling by 1/2 and 2
#: is exact in floating point), so its spread is 0; saturating and smooth ones move by far
#: more at any input temperature.
ENGINE_TOLERANCE = 1e-7


def engine_type(probe_spread: np.ndarray) -> np.ndarray:
    """'A' (scale-invariant), 'B' (temperature-dependent) or '' (not probed) per site."""
    spread = np.asarray(probe_spread, dtype=np.float64)
    return np.where(spread < 0, "", np.where(spread <= ENGINE_TOLERANCE, "A", "B"))


def network_engine_type(site_types: np.ndarray) -> str:
    """The network is Type A when all its probed sites are; '' when none was probed."""
    known = [t for t in site_types if t]
    if not known:
        return ""
    return "A" if all(t == "A" for t in known) else "B"


def slope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope of y (n, ...) against x (n,) and its standard error.

    Used for the job's energy, which carries minibatch noise: the slope's standard error
    is the noise floor below which the energy change over the window is not resolved.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    # the job's thermometer fits two series a sample: the means as x.mean() computes them (sum / n)
    # and, for one series, the dot product tensordot reduces to, without their wrappers' cost
    xc = x - np.add.reduce(x) / n
    sxx = float(xc @ xc)
    if n < 2 or sxx == 0.0:
        nan = np.full(y.shape[1:], np.nan)
        return nan, nan
    yc = y - np.add.reduce(y, axis=0) / n
    b = (np.dot(xc, yc) if y.ndim == 1 else np.tensordot(xc, yc, axes=(0, 0))) / sxx
    if n < 3:
        return b, np.zeros_like(b)
    resid = yc - np.multiply.outer(xc, b)
    se = np.sqrt((resid * resid).sum(axis=0) / (n - 2) / sxx)
    return b, se
