"""From a series of samples to the thermodynamic readings (docs/science.md sections 2-5).

`Thermometer` keeps a sliding window of the last `window` samples of one job and derives,
at every sample:

* per layer: entropy S_l = n_l h_l (gaussian estimator), the work of the last sampled
  update, and beta_l = Delta S_l / Delta E_l over the window, where Delta E_l is the layer's
  work summed over the window. Work is only measured on sampled steps, so each sampled
  w_{l,t} stands for the `gap` steps until the next sample (an unbiased estimate of the
  work done over them);
* for the job: S = sum_l S_l, and beta = (dS/dt) / (dE/dt) from least-squares slopes over
  the window. Where the training loop gave no loss (zero-code instrumentation), the energy
  is the cumulative work sum_l sum_{s<t} w_{l,s} since the first sample (E_0 = 0): to first
  order it is E_t - E_0 (docs/science.md section 2), so slopes and temperatures keep their meaning;
  `Reading.energy_from_work` says which it is. The slope of the noisy minibatch energy is the
  "smoothed" energy change, and its standard error is the noise floor under which T is undefined;
* per layer also, from the latest sample that took histograms, the histogram entropy (fixed
  edges, seeded subset), the negentropy J = h_gauss - h_hist (nats per value; how far the
  layer is from a Gaussian shape) and the share of its subset outside the edges;
* per activation site: eta = 1 - Var(a)/Var(z), and the network's 1 - prod(1 - eta); and its
  engine type from the latest scale probe, and the network's.

The agent uses it in-process (`Monitor.latest()`), the collector on merged samples.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from . import physics
from .stats import LayerInfo, Sample, SiteInfo

#: Samples per temperature window, the agent's and the collector's default alike.
WINDOW = 10
#: Standard errors the job's energy slope must exceed for the temperature to be defined.
ENERGY_SLOPE_SIGMAS = 2.0


@dataclass(frozen=True)
class Reading:
    """Derived values at one sample. NaN means undefined (see `physics.temperature`)."""

    step: int
    wall_time: float
    energy: float
    entropy: float
    beta: float
    temperature: float
    efficiency: float
    layer_names: tuple[str, ...]
    layer_entropy: np.ndarray
    layer_work: np.ndarray
    layer_beta: np.ndarray
    layer_temperature: np.ndarray
    layer_histogram_entropy: np.ndarray  # n * h_hist (nats), comparable with layer_entropy
    layer_negentropy: np.ndarray  # h_gauss - h_hist, nats per value
    layer_outside: np.ndarray  # share of the histogram subset outside the edges
    site_names: tuple[str, ...]
    site_efficiency: np.ndarray
    site_engine: np.ndarray  # "A", "B" or "" (not probed yet)
    engine: str  # the network's engine type
    energy_from_work: bool = False  # energy is the cumulative work (no loss was given)


class Thermometer:
    """Windowed derivation for one job; feed it samples in step order."""

    def __init__(self, layers: list[LayerInfo], sites: list[SiteInfo], window: int = WINDOW) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2 samples, got {window}")
        self.layer_names = tuple(layer.name for layer in layers)
        self.site_names = tuple(site.name for site in sites)
        self._lo = np.array([layer.hist_lo for layer in layers])
        self._hi = np.array([layer.hist_hi for layer in layers])
        self._probe = np.full(len(sites), -1.0)  # last probe spread per site
        nan = np.full(len(layers), np.nan)
        self._shape = (nan, nan, nan)  # h_hist, negentropy, outside share, from the last histogram
        self._steps: deque[int] = deque(maxlen=window)
        self._energy: deque[float] = deque(maxlen=window)
        self._entropy: deque[np.ndarray] = deque(maxlen=window)
        self._total: deque[np.float64] = deque(maxlen=window)  # each entropy's sum, for the job's slope
        self._work: deque[np.ndarray] = deque(maxlen=window)  # cumulative work at each sample
        self._last: Sample | None = None
        self.latest: Reading | None = None
        self._engines = (self._probe.copy(), *_engines(self._probe))  # (probe, site types, network type)

    def __setstate__(self, state: dict) -> None:
        """Unpickle, giving a thermometer saved by an older collector (a job's state) the caches
        it did not keep."""
        self.__dict__.update(state)
        if "_total" not in state:
            self._total = deque((e.sum() for e in self._entropy), maxlen=self._entropy.maxlen)
        if "_engines" not in state:
            self._engines = (self._probe.copy(), *_engines(self._probe))

    def update(self, sample: Sample) -> Reading:
        """Add one sample (a step after the previous one) and return the new reading."""
        prev = self._last
        if prev is not None and sample.step <= prev.step:
            raise ValueError(f"sample for step {sample.step} after step {prev.step}")
        layers = sample.layers
        # physics.layer_entropy, keeping h_gauss for the histogram's negentropy
        h_gauss = physics.gaussian_entropy(physics.variance(layers.count, layers.mean, layers.m2))
        entropy = np.asarray(layers.count, dtype=np.float64) * h_gauss
        total = entropy.sum()
        if prev is None:
            cumulative = np.zeros(len(layers))
        else:
            cumulative = self._work[-1] + prev.layers.work * (sample.step - prev.step)
        energy = sample.energy if sample.has_energy else float(cumulative.sum())
        self._steps.append(sample.step)
        self._energy.append(energy)
        self._entropy.append(entropy)
        self._total.append(total)
        self._work.append(cumulative)
        self._last = sample

        layer_beta, layer_t = physics.temperature(
            entropy - self._entropy[0],
            cumulative - self._work[0],
            entropy_floor=physics.ENTROPY_RESOLUTION * layers.count,
            energy_floor=physics.WORK_RESOLUTION,
        )
        beta, temp = self._job_temperature()
        sites = sample.sites
        eta = physics.site_efficiency(
            physics.variance(sites.count, sites.in_mean, sites.in_m2),
            physics.variance(sites.count, sites.out_mean, sites.out_m2),
        )
        self._probe = np.where(sites.probe_spread >= 0, sites.probe_spread, self._probe)
        if not np.array_equal(self._probe, self._engines[0]):  # probes are rare: their types are kept
            self._engines = (self._probe.copy(), *_engines(self._probe))
        _, site_engine, engine = self._engines
        if layers.histogram is not None:
            h_hist = physics.histogram_entropy(layers.histogram, self._lo, self._hi)
            self._shape = (h_hist, h_gauss - h_hist, physics.outside_fraction(layers.histogram))
        h_hist, negentropy, outside = self._shape
        self.latest = Reading(
            step=sample.step,
            wall_time=sample.wall_time,
            energy=energy,
            entropy=float(total),
            beta=beta,
            temperature=temp,
            efficiency=physics.network_efficiency(eta),
            layer_names=self.layer_names,
            layer_entropy=entropy,
            layer_work=layers.work,
            layer_beta=layer_beta,
            layer_temperature=layer_t,
            layer_histogram_entropy=layers.count * h_hist,
            layer_negentropy=negentropy,
            layer_outside=outside,
            site_names=self.site_names,
            site_efficiency=eta,
            site_engine=site_engine,
            engine=engine,
            energy_from_work=not sample.has_energy,
        )
        return self.latest

    def _job_temperature(self) -> tuple[float, float]:
        """Job beta and T from the slopes of S and E against step over the window."""
        steps = np.asarray(self._steps, dtype=np.float64)
        energy = np.asarray(self._energy, dtype=np.float64)
        known = np.isfinite(energy)
        if np.count_nonzero(known) < 3:
            return math.nan, math.nan
        steps = steps[known]
        ds, _ = physics.slope(steps, np.asarray(self._total)[known])
        de, de_err = physics.slope(steps, energy[known])
        count = float(self._last.layers.count.sum()) if self._last is not None else 0.0
        span = float(steps[-1] - steps[0])
        beta, temp = physics.temperature(
            ds * span,
            de * span,
            entropy_floor=physics.ENTROPY_RESOLUTION * count,
            energy_floor=ENERGY_SLOPE_SIGMAS * de_err * span,
        )
        return float(beta), float(temp)


def _engines(probe: np.ndarray) -> tuple[np.ndarray, str]:
    """Each site's engine type and the network's, from the last probe spreads."""
    site_engine = physics.engine_type(probe)
    return site_engine, physics.network_engine_type(site_engine)
