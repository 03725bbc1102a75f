"""Online phase detection (docs/science.md section 6) on a job's merged series, one update per sample.

States: `type_i` (as initialized), `transition` (learning: a significant, sustained change),
`type_ii` (ordered: no significant drift), `refresh` (a system whose energy jumps, e.g. after a
data shift, and starts learning again: from type_ii, or already while it was learning),
`unstable` (energy rising significantly with no shift to absorb: divergence, loss spikes).

What is detected on what. The job's states come from its energy E_t (the minibatch loss); each
layer's from its entropy per value h_t = S_l / n_l. The inverse temperature beta = dS/dE is a
ratio of the slopes of these same two series (undefined while dE is in the noise), so it adds
no evidence of its own and is not fed to the detector. `unstable` is a job state only: it is
defined by the energy, which a layer does not have in the merged series.

Why this method, for the job. Training curves trend, their minibatch noise is large (about 20 %
of the loss for a batch of 64) and proportional to the loss, and the events that matter are
jumps (a data shift, a divergence) on top of the trend:

* the detector works on x_t = ln E_t. In logs the noise is homoscedastic (its scale does not
  change when the loss drops tenfold or jumps), an exponential divergence is a straight ramp,
  and every threshold is a relative change, the same for any loss's units. (A job whose
  energy is ever <= 0 cannot be logged: from that sample on it is followed in linear units.)
* De-trending: a least-squares line over the last `window` samples gives the slope, its t
  statistic and the residual scale sigma (the noise). Each new sample is compared with a
  reference, the larger of the line's forecast and the window's mean: on a descending curve
  the line's extrapolation runs below the flattening loss (every learning curve's knee would
  look like a rise), so the window's level is the conservative reference there; on a rising
  trend the forecast is, so that a steady ramp is left to the slope test.
* Jumps: Page's one-sided CUSUM, C = max(0, C + r - k), on the standardized excess
  r = (x - reference) / sigma_forecast; an alarm when C > h. CUSUM is the classical sequential
  test for a shift in mean (optimal in Lorden's sense for a known noise law), costs O(1), and
  needs nothing but the noise scale, which the window gives. With k = 1 and h = 8 one sample
  9 sigma above the reference alarms at once (a Shewhart limit for big jumps), a sustained
  3 sigma excess in about 5 samples, and Gaussian noise alone never did in 60,000 simulated
  samples. While C > 0 the reference is the window as it was before the excursion began (up
  to `lag` samples back): Page's test assumes the pre-change mean known, and a window that
  absorbed the excursion would chase it and hide a moderate shift. The test starts once the
  window holds `min_ref` samples (a noise scale from fewer is unreliable).
* An alarm is a `refresh` if the job was in type_i, transition or type_ii, else `unstable` (a
  second jump after a refresh, or a jump while unstable). The window then restarts at the jump
  (the old regime would bias every fit). A data shift is a step, after which the loss stops
  rising and descends (re-learning), whatever phase it came in: data that change while a model
  still learns are a shift too (a jump there used to be called `unstable`, a critical alert for
  what was a shift). A divergence keeps climbing: a refresh whose energy climbs `escalate`
  sigmas (the pre-jump sigma: in logs the noise scale carries over a jump) above everything
  since the jump escalates to `unstable`, typically one sample later. So a jump is a refresh
  until it proves to be a divergence. Measuring against the post-jump peak rather than its mean
  keeps a shift whose new data are noisier from escalating.
* The cooldown: after every change, `cooldown` samples during which no other change is called
  (a jump that arrives then is called when it ends), so that one event is not reported as
  several. Jumps to `unstable` (a refresh still climbing, or a second jump) are exempt: those
  samples are exactly when a jump turns out to be a divergence; so are jumps out of type_i or
  transition (the change they follow was a trend's, another event, and a divergence must be
  called `refresh` at once to escalate in time).
* Trends: a descent with t < -t_sig for `confirm` samples in a row is a `transition`; an ascent
  with t > t_rise for `confirm_rise` samples is `unstable` (a divergence without a jump); a
  slope that is insignificant (|t| < t_quiet) and under `quiet_rate` of the steepest
  significant descent since the last restart, for `settle` samples in a row, is `type_ii`.
* Creeps: a sliding window de-trends away a rise too slow to be significant within it (2 % per
  sample is 2 sigma over 20 samples). So on entering type_ii the detector records the
  equilibrium level (the window's mean) and runs a second CUSUM on the excess over it, with
  allowance `drift_k` and threshold `drift_h`: a loss that creeps up from its equilibrium by
  more than 1.5 sigma for long enough is `unstable`.

Alternatives considered: a truncated-run-length BOCPD needs a predictive model of the trend
as well (a Gaussian-process or linear-trend hazard), costs O(run length) per update instead of
O(1), and gives the same verdict on jumps this large. The drift detectors of `river` (ADWIN,
Page-Hinkley, KSWIN) assume a stationary mean between changes: on a loss that trends down for
thousands of steps they flag the trend itself, so they would need this de-trending anyway.

Why this method, for the layers. An entropy per value has no minibatch noise of its own: it
moves like a random walk (SGD noise) plus a drift while the layer learns, at rates that differ
by orders of magnitude between layers (a 1-value bias against a 1 M-value weight). So the
statistics are scale-free, per layer, over the last `window` increments d_t = h_t - h_{t-1}:

* the directionality ER = |sum d| / sum |d| (Kaufman's efficiency ratio, in [0, 1]): about
  1 / sqrt(window) for a random walk, near 1 for a sustained drift (learning);
* the drift rate |sum d| / window, against the layer's peak rate while it learned (kept
  until a refresh, so that a slow late drift counts as quiet);
* the speed |d| against the layer's baseline speed, an EWMA of the window's median |d| learned
  while it is in type_ii.

A layer leaves type_i once it has moved more than `tol` nats per value from where it started
(a frozen layer never does): to `transition` when it drifts (ER >= er_hi for `confirm`
samples), else to `type_ii` once it has stayed quiet for `settle` samples. Quiet is undirected
(ER < er_lo) or drifting at under `quiet_rate` of its peak rate; a transition that stays quiet
for `settle` samples is `type_ii`. A type_ii layer is in `refresh` when the job's energy has
jumped within the last `window` samples and the median of the layer's last three speeds
exceeds `burst` times its baseline (the median makes one odd sample harmless): the layer
re-learns after a shift. Without a jump, a type_ii layer that drifts again (ER >= er_hi for
`settle` samples at over `wake_rate` of its peak rate) is back in `transition`; tying layer
refreshes to the energy keeps the bursts of a degenerate series (a 1-value bias, whose
"entropy" is the log of its magnitude) from raising alarms. All layers are updated at once,
with numpy over a (window x layers) ring buffer: no Python loop runs over the layers.

Known limits (measured in `tests/bench/bench_detection.py` and the tests): a loss spike that
SGD absorbs within a sample or two (a "catapult") is reported as a refresh, not as unstable;
no jump is detected in a run's first `min_ref` samples (only the slope test and an infinite
energy can call `unstable` there); heavy-tailed losses raise more false jumps than Gaussian
ones (0.15 per 1,000 samples for Student-t noise with 5 degrees of freedom in ln E).

Cost per update: O(window) for the job; O(window x layers), vectorized, for the layers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import saved as checked

PHASES = ("type_i", "transition", "type_ii", "refresh", "unstable")
TYPE_I, TRANSITION, TYPE_II, REFRESH, UNSTABLE = range(5)
#: Every change a detector can report, for counters initialized at zero.
TRANSITIONS = tuple(
    (PHASES[a], PHASES[b])
    for a, b in (
        (TYPE_I, TRANSITION), (TYPE_I, TYPE_II), (TYPE_I, REFRESH), (TYPE_I, UNSTABLE),
        (TRANSITION, TYPE_II), (TRANSITION, REFRESH), (TRANSITION, UNSTABLE),
        (TYPE_II, REFRESH), (TYPE_II, TRANSITION), (TYPE_II, UNSTABLE),
        (REFRESH, TRANSITION), (REFRESH, TYPE_II), (REFRESH, UNSTABLE),
        (UNSTABLE, TRANSITION), (UNSTABLE, TYPE_II),
    )
)  # fmt: skip


#: The largest float64: what np.nan_to_num makes of an infinity.
_FLOAT_MAX = np.finfo(np.float64).max


@dataclass(frozen=True)
class Change:
    """One detected change of state: `series` is -1 for the job, else the layer's index."""

    series: int
    step: int
    before: str
    after: str
    statistic: str
    confidence: float


@dataclass(frozen=True)
class Settings:
    """Thresholds (the defaults are the ones `tests/bench/bench_detection.py` measured)."""

    window: int = 20  # samples in the sliding fits (job) and increments (layers)
    min_fit: int = 5  # samples a slope fit needs before its t statistic is used
    min_ref: int = 10  # samples the CUSUM's reference needs (its noise scale is estimated)
    t_sig: float = 4.0  # |t| of a significant energy slope
    t_quiet: float = 2.0  # |t| under which the energy slope is insignificant
    confirm: int = 3  # consecutive significant samples to call a transition
    t_rise: float = 4.0  # t of a significant energy ascent
    confirm_rise: int = 5  # consecutive significant samples to call an ascent unstable
    settle: int = 8  # consecutive quiet samples to call type_ii
    cusum_k: float = 1.0  # CUSUM allowance, in forecast sigmas
    cusum_h: float = 8.0  # CUSUM alarm threshold, in forecast sigmas
    drift_k: float = 1.5  # allowance of the CUSUM over the equilibrium level, in sigmas
    drift_h: float = 16.0  # its alarm threshold: a creep away from type_ii is unstable
    escalate: float = 8.0  # sigmas a refresh's energy must climb past its post-jump peak: unstable
    lag: int = 10  # most samples the CUSUM's reference is held back during an excursion
    sigma_floor: float = 1e-3  # least noise scale (ln E): smaller relative changes are no jumps
    cooldown: int = 5  # samples after a change during which no other is called (but escalations)
    tol: float = 1e-3  # nats per value a layer must move to leave type_i
    er_hi: float = 0.7  # directionality of a drifting layer
    er_lo: float = 0.4  # directionality under which a layer is undirected
    quiet_rate: float = 0.1  # share of its peak drift rate under which a layer is quiet
    wake_rate: float = 0.3  # share of its peak drift rate over which a type_ii layer drifts again
    burst: float = 5.0  # speed over baseline of a layer that learns again
    baseline_alpha: float = 0.05  # EWMA weight of the layers' baseline speed


class PhaseDetector:
    """Phases of one job and its layers; feed `update` the merged samples in step order.

    Its state is its own to save and restore (`to_state`, `from_state`: plain named values, the
    names a file format's, collector/state/schema.py stores them)."""

    def __init__(self, n_layers: int, settings: Settings | None = None) -> None:
        s = self.s = settings or Settings()
        self.job = TYPE_I
        self.layers = np.full(n_layers, TYPE_I)
        # the job: (step, x) history; the newest `window` are the fit, `lag` more the held-back one
        self._steps: deque[float] = deque(maxlen=s.window + s.lag)
        self._x: deque[float] = deque(maxlen=s.window + s.lag)
        self._log = True  # x = ln E while every energy has been positive
        self._sigma = math.nan  # the last fitted noise scale, carried over a restart
        self._cusum = 0.0
        self._excursion = 0  # consecutive samples with C > 0
        self._peak_descent = 0.0  # steepest significant descent since the last restart (x per step)
        self._down = self._up = self._quiet = 0
        self._cool = 0
        self._since_jump = math.inf  # samples since the job's last energy jump
        self._level = math.nan  # ln E of the equilibrium (set on entering type_ii), and its sigma
        self._level_sigma = math.nan
        self._drift = 0.0  # CUSUM of the excess over that level
        # the layers: ring buffer of increments, and per-layer state
        self._ring = np.zeros((s.window, n_layers))
        self._count = 0  # increments pushed
        self._last: np.ndarray | None = None  # last finite entropy per value
        self._initial: np.ndarray | None = None
        self._hi = np.zeros(n_layers, dtype=np.int64)
        self._lo = np.zeros(n_layers, dtype=np.int64)
        self._peak = np.zeros(n_layers)  # peak drift rate of the layer's learning (since a refresh)
        self._baseline = np.full(n_layers, np.nan)  # baseline speed (type_ii)
        self._layer_cool = np.zeros(n_layers, dtype=np.int64)

    def to_state(self) -> dict[str, Any]:
        """What the detector carries from one sample to the next, as plain named values: its
        settings, the job's phase, its (step, x) window and the statistics of its tests, each
        layer's phase, increments and counters. A snapshot: every array is a copy (the detector
        writes into some of its own).

        The names are a file format's (collector/state/schema.py stores them under `detector.`):
        renaming an attribute changes this method and `from_state`, never a name. A field added
        later is read with a default (see `from_state`), so it needs no new format."""
        return {
            "settings": {f.name: getattr(self.s, f.name) for f in fields(Settings)},
            "job": self.job,
            "log_energy": self._log,
            "sigma": self._sigma,
            "cusum": self._cusum,
            "excursion": self._excursion,
            "peak_descent": self._peak_descent,
            "down": self._down,
            "up": self._up,
            "quiet": self._quiet,
            "cooldown": self._cool,
            "since_jump": self._since_jump,  # inf until the first jump, then a count
            "level": self._level,
            "level_sigma": self._level_sigma,
            "drift": self._drift,
            "steps": np.array(self._steps, dtype=np.float64),
            "x": np.array(self._x, dtype=np.float64),
            "layers": self.layers.copy(),
            "layer_count": self._count,
            "ring": self._ring.copy(),
            "layer_last": _copy(self._last),  # None until the first sample
            "layer_initial": _copy(self._initial),
            "layer_hi": self._hi.copy(),
            "layer_lo": self._lo.copy(),
            "layer_peak": self._peak.copy(),
            "layer_baseline": self._baseline.copy(),
            "layer_cooldown": self._layer_cool.copy(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PhaseDetector:
        """The detector `to_state` saved, carrying on to the bit as it would have (with copies of
        the state's arrays: it writes into some).

        Its layers' phases are required (they say how many layers); any other field the state
        lacks (saved before the field was added) is what a new detector of those layers and
        settings holds (`__init__`; a missing setting, its default). A field it does not know
        (saved by a later release) is ignored (collector/state/schema.py says why). A state that
        does not fit (a shape, a phase, a setting out of bounds) raises ValueError."""
        saved = state.get("settings", {})
        settings = Settings(
            **{f.name: _setting(f.name, f.type, saved[f.name]) for f in fields(Settings) if f.name in saved}
        )
        n = len(checked.array(state["layers"], (-1,), "layers", "iu"))
        window = settings.window
        checked.count(window * max(n, 1), "ring's size (window x layers)", 0, checked.MOST)
        d = cls(n, settings)
        v = {**d.to_state(), **state}
        d.job = _phase(v["job"], "job")
        d._log = bool(v["log_energy"])
        d._sigma = float(v["sigma"])
        d._cusum = float(v["cusum"])
        d._excursion = int(v["excursion"])
        d._peak_descent = float(v["peak_descent"])
        d._down, d._up, d._quiet = int(v["down"]), int(v["up"]), int(v["quiet"])
        d._cool = int(v["cooldown"])
        since_jump = float(v["since_jump"])
        d._since_jump = int(since_jump) if math.isfinite(since_jump) else since_jump
        d._level = float(v["level"])
        d._level_sigma = float(v["level_sigma"])
        d._drift = float(v["drift"])
        held = window + settings.lag
        steps = checked.array(v["steps"], (-1,), "steps")
        x = checked.array(v["x"], (len(steps),), "x")
        if len(steps) > held:
            raise ValueError(f"steps: {len(steps)} held, more than the window's {held}")
        d._steps.extend(steps.tolist())
        d._x.extend(x.tolist())
        layers = checked.array(v["layers"], (n,), "layers", "iu")
        if n and not 0 <= layers.min() <= layers.max() < len(PHASES):
            raise ValueError(f"layers: phases {layers.min()}..{layers.max()}, not indices of {PHASES}")
        d.layers = np.array(layers)
        d._count = checked.count(v["layer_count"], "layer_count")
        d._ring = np.array(checked.array(v["ring"], (window, n), "ring"), dtype=np.float64)
        d._last = _copy(
            None if v["layer_last"] is None else checked.array(v["layer_last"], (n,), "layer_last")
        )
        d._initial = _copy(
            None if v["layer_initial"] is None else checked.array(v["layer_initial"], (n,), "layer_initial")
        )
        d._hi = np.array(checked.array(v["layer_hi"], (n,), "layer_hi", "iu"))
        d._lo = np.array(checked.array(v["layer_lo"], (n,), "layer_lo", "iu"))
        d._peak = np.array(checked.array(v["layer_peak"], (n,), "layer_peak"))
        d._baseline = np.array(checked.array(v["layer_baseline"], (n,), "layer_baseline"))
        d._layer_cool = np.array(checked.array(v["layer_cooldown"], (n,), "layer_cooldown", "iu"))
        return d

    @property
    def job_phase(self) -> str:
        return PHASES[self.job]

    def layer_phases(self) -> list[str]:
        return [PHASES[p] for p in self.layers]

    def update(self, step: int, energy: float, entropy_per_value: np.ndarray) -> list[Change]:
        """Add one sample; return the changes it revealed (job first, then layers).

        A NaN or -inf energy (no loss reported) leaves the job as it is; +inf is a divergence.
        """
        changes = self._update_job(step, float(energy))
        return changes + self._update_layers(step, np.asarray(entropy_per_value, dtype=np.float64))

    # -- the job's energy ----------------------------------------------------------------------

    def _update_job(self, step: int, energy: float) -> list[Change]:
        s = self.s
        if math.isnan(energy) or energy == -math.inf:
            return []
        self._since_jump += 1
        changes: list[Change] = []

        def move(to: int, statistic: str, confidence: float) -> None:
            changes.append(Change(-1, step, PHASES[self.job], PHASES[to], statistic, confidence))
            self.job, self._cool = to, s.cooldown
            self._down = self._up = self._quiet = 0
            self._drift = 0.0
            if to == TYPE_II:  # the equilibrium it settled at: the level and noise of the window
                self._level = float(np.mean(np.asarray(self._x)[-s.window :]))
                self._level_sigma = self._sigma

        if energy == math.inf:
            if self.job != UNSTABLE:
                move(UNSTABLE, "energy_overflow", 1.0)
            self._since_jump = 0
            self._restart()
            return changes
        if self._log and energy <= 0:  # from now on in linear units; the logged window is void
            self._log = False
            self._restart()
            self._sigma = math.nan
        x = math.log(energy) if self._log else energy

        # a refresh whose energy climbs far past everything since its jump: a divergence
        climbing = (
            self.job == REFRESH
            and len(self._x) > 0
            and not math.isnan(self._sigma)
            and x - max(self._x) >= s.escalate * self._sigma
        )
        # the jump test: CUSUM of the excess over the reference held before the excursion
        r = self._excess(step, x)
        if r is not None:
            self._cusum = max(0.0, self._cusum + r - s.cusum_k)
        self._excursion = self._excursion + 1 if self._cusum > 0 else 0
        self._steps.append(float(step))
        self._x.append(x)
        if self.job == TYPE_II and self._level_sigma > 0:  # NaN (no sigma yet) compares False
            excess = (x - self._level) / self._level_sigma
            self._drift = max(0.0, self._drift + excess - s.drift_k)

        # the trend tests: slope of the newest window, this sample included
        fit = _line(np.asarray(self._steps)[-s.window :], np.asarray(self._x)[-s.window :], s.min_fit)
        t = slope = 0.0
        if fit is not None:
            slope, _, slope_se, _ = fit
            t = slope / slope_se if slope_se > 0 else 0.0
            if t < -s.t_sig:
                self._peak_descent = max(self._peak_descent, -slope)
            self._down = self._down + 1 if t < -s.t_sig else 0
            self._up = self._up + 1 if t > s.t_rise else 0
            quiet = abs(t) < s.t_quiet and abs(slope) <= s.quiet_rate * self._peak_descent
            quiet = quiet or (abs(t) < s.t_quiet and self._peak_descent == 0)
            self._quiet = self._quiet + 1 if quiet else 0

        if climbing:  # exempt from the cooldown, which exists for exactly these samples
            move(UNSTABLE, "energy_still_rising", _confidence((x - max(self._x)) / s.escalate))
            self._since_jump = 0
            self._restart(keep_last=True)
            return changes
        if self._cusum > s.cusum_h:
            jumped = UNSTABLE if self.job in (REFRESH, UNSTABLE) else REFRESH  # a shift until it climbs
            # an escalation skips the cooldown, and so does a jump out of a learning phase: what
            # came within the cooldown there was a trend's change, not this jump
            if jumped == UNSTABLE or self._cool == 0 or self.job in (TYPE_I, TRANSITION):
                if jumped != self.job:
                    move(jumped, "cusum_energy_jump", _confidence(self._cusum / s.cusum_h))
                self._since_jump = 0
                self._restart(keep_last=True)
                return changes
        if self._cool > 0:
            self._cool -= 1
            return changes
        if self.job == TYPE_II and self._drift > s.drift_h:
            move(UNSTABLE, "energy_above_equilibrium", _confidence(self._drift / s.drift_h))
        elif self._down >= s.confirm and self.job != TRANSITION:
            move(TRANSITION, "energy_slope_t", _confidence(-t / s.t_sig))
        elif self._up >= s.confirm_rise and self.job != UNSTABLE:
            move(UNSTABLE, "energy_slope_t", _confidence(t / s.t_rise))
        elif self._quiet >= s.settle and self.job != TYPE_II:
            move(TYPE_II, "energy_slope_t", _confidence(s.t_sig / max(abs(t), 1e-9) / 2))
        return changes

    def _excess(self, step: int, x: float) -> float | None:
        """(x - reference) / forecast sigma, the reference held back over the excursion so far."""
        s = self.s
        held = min(self._excursion, s.lag, len(self._x))
        xs = np.asarray(self._x)[: len(self._x) - held][-s.window :]
        steps = np.asarray(self._steps)[: len(self._steps) - held][-s.window :]
        fit = _line(steps, xs, s.min_ref)
        if fit is None:  # too few samples since the start or a restart to know the noise
            return None
        slope, intercept, _, sigma = fit
        sigma = self._sigma = max(sigma, self._sigma_floor())  # kept for after a restart
        n, mean_step = len(xs), float(_mean(steps))
        sxx = float(np.add.reduce((steps - mean_step) ** 2))
        forecast_sigma = sigma * math.sqrt(1 + 1 / n + (step - mean_step) ** 2 / sxx)
        reference = max(intercept + slope * step, float(_mean(xs)))
        return (x - reference) / forecast_sigma

    def _sigma_floor(self) -> float:
        if self._log:
            return self.s.sigma_floor
        level = abs(float(np.mean(self._x))) if self._x else 0.0
        return self.s.sigma_floor * max(level, 1e-12)

    def _restart(self, keep_last: bool = False) -> None:
        """Forget the window (after a jump the old regime would bias every fit)."""
        step, x = (self._steps[-1], self._x[-1]) if keep_last and self._x else (None, None)
        self._steps.clear()
        self._x.clear()
        if step is not None and x is not None:
            self._steps.append(step)
            self._x.append(x)
        self._cusum = 0.0
        self._excursion = 0
        self._peak_descent = 0.0
        self._down = self._up = self._quiet = 0

    # -- the layers' entropies -----------------------------------------------------------------

    def _update_layers(self, step: int, h: np.ndarray) -> list[Change]:
        s = self.s
        if self._last is None:
            self._last = np.where(np.isfinite(h), h, np.nan)
            self._initial = self._last.copy()
            return []
        known = np.isfinite(h)
        first = known & np.isnan(self._last)  # a layer's first finite value: no increment yet
        self._initial = np.where(first, h, self._initial)
        d = np.where(known & ~first, h - self._last, 0.0)
        self._last = np.where(known, h, self._last)
        self._ring[self._count % s.window] = d
        self._count += 1
        n = min(self._count, s.window)
        ring = self._ring[:n]
        speed = np.abs(ring)
        net = np.add.reduce(ring, axis=0)  # (ndarray.sum's value, without its Python wrapper)
        path = np.add.reduce(speed, axis=0)
        drift = np.abs(net)
        er = np.divide(drift, path, out=np.zeros_like(path), where=path > 0)
        rate = drift / n
        # |np.nan_to_num(last - initial)| without its cost: fmax reads NaN as 0, minimum inf as the
        # largest float
        moved = np.minimum(np.fmax(np.abs(self._last - self._initial), 0.0), _FLOAT_MAX) > s.tol

        state = self.layers
        if self._count < s.min_fit:
            return []
        drifting = er >= s.er_hi
        self._hi = np.where(drifting, self._hi + 1, 0)
        learning = (state != TYPE_II) & drifting
        self._peak = np.where(learning, np.maximum(self._peak, rate), self._peak)
        quiet = (er < s.er_lo) | (rate <= s.quiet_rate * self._peak)
        self._lo = np.where(quiet, self._lo + 1, 0)
        calm = state == TYPE_II
        if np.logical_or.reduce(calm):  # the medians are most of an update's cost: only where read
            typical = _median(speed[:, calm])
            baseline = self._baseline[calm]
            self._baseline[calm] = np.where(
                np.isnan(baseline), typical, (1 - s.baseline_alpha) * baseline + s.baseline_alpha * typical
            )
        ready = self._layer_cool == 0
        new = state.copy()
        leaving = (state == TYPE_I) & moved
        new[leaving & (self._hi >= s.confirm)] = TRANSITION
        new[leaving & (self._lo >= s.settle)] = TYPE_II
        new[(state == TRANSITION) & ready & (self._lo >= s.settle)] = TYPE_II
        recent = None  # the median of the newest three speeds, where it is read
        if self._since_jump <= s.window:  # the energy jumped: layers that start moving again
            recent = np.full(len(state), np.nan)
            candidates = calm & ready & (self._baseline > 0)
            recent[candidates] = _median(speed[_last_rows(self._count, s.window, 3)][:, candidates])
            new[candidates & (recent > s.burst * self._baseline)] = REFRESH
        waking = (self._hi >= s.settle) & ((self._peak == 0) | (rate > s.wake_rate * self._peak))
        new[calm & ready & waking] = TRANSITION  # drifting again, without a jump
        refreshing = (state == REFRESH) & ready
        new[refreshing & (self._hi >= s.confirm)] = TRANSITION
        new[refreshing & (self._lo >= s.settle)] = TYPE_II
        changed = np.flatnonzero(new != state)
        if len(changed) == 0:
            self._layer_cool = np.maximum(self._layer_cool - 1, 0)
            return []
        self._peak[changed[new[changed] == REFRESH]] = 0.0  # a new regime: its own learning peak
        self._hi[changed] = self._lo[changed] = 0
        self._layer_cool = np.maximum(self._layer_cool - 1, 0)
        self._layer_cool[changed] = s.cooldown
        changes = []
        for j in changed:  # only the layers that changed, rarely more than a few per sample
            if new[j] == REFRESH:
                statistic, ratio = "entropy_speed_burst", recent[j] / (s.burst * self._baseline[j])
            elif new[j] == TRANSITION:
                statistic, ratio = "entropy_directionality", er[j] / s.er_hi
            else:
                statistic, ratio = "entropy_directionality", s.er_lo / max(er[j], 1e-9)
            changes.append(
                Change(int(j), step, PHASES[state[j]], PHASES[new[j]], statistic, _confidence(ratio))
            )
        self.layers = new
        return changes


def _setting(name: str, kind: str, value: Any) -> int | float:
    """A saved setting of `Settings`, checked: a count within bounds, a finite number (ValueError)."""
    if kind == "int":
        return checked.count(value, f"settings.{name}", 2 if name == "window" else 0, 1 << 20)
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"settings.{name}: {x}, not a finite number")
    return x


def _phase(value: Any, name: str) -> int:
    """A saved phase (an index of `PHASES`), checked (ValueError)."""
    return checked.count(value, name, 0, len(PHASES) - 1)


def _copy(a: np.ndarray | None) -> np.ndarray | None:
    """A copy of `a` (of its dtype), or None."""
    return None if a is None else np.array(a)


def _median(a: np.ndarray) -> np.ndarray:
    """np.median(a, axis=0), the same values to the bit, in half its time: a sort, then the middle
    value or the mean of the middle two ((x + y) / 2, as np.mean computes it); NaN where a
    column holds one (the sort puts it last)."""
    n = len(a)
    s = np.sort(a, axis=0)
    middle = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    nan = np.isnan(s[-1])
    return np.where(nan, np.nan, middle) if np.logical_or.reduce(nan) else middle


def _last_rows(count: int, window: int, k: int) -> np.ndarray:
    """Ring-buffer rows of the newest min(k, count) increments."""
    return (count - 1 - np.arange(min(k, count, window))) % window


def _line(x: np.ndarray, y: np.ndarray, min_n: int = 5) -> tuple[float, float, float, float] | None:
    """Least-squares line: (slope, intercept, slope standard error, residual sigma)."""
    n = len(y)
    if n < max(min_n, 3):
        return None
    xm, ym = _mean(x), _mean(y)
    xc = x - xm
    sxx = float(xc @ xc)
    if sxx == 0:
        return None
    slope = float(xc @ (y - ym)) / sxx
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    sigma = math.sqrt(float(resid @ resid) / (n - 2))
    return slope, intercept, sigma / math.sqrt(sxx), sigma


def _mean(x: np.ndarray) -> np.float64:
    """x.mean() of a 1-D float64 array, the same value (its sum divided by the count), at a
    third of the cost of the method's Python wrapper: the job's fits take several a sample."""
    return np.add.reduce(x) / len(x)


def _confidence(ratio: float) -> float:
    """Map how far a statistic went past its threshold (ratio >= 1) into (0.5, 1)."""
    return float(1.0 - 0.5 * math.exp(-(max(ratio, 1.0) - 1.0)))
