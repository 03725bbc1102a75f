"""From a series of samples to the thermodynamic readings (docs/science.md sections 2-5).

`Thermometer` keeps a sliding window of the last `window` samples of one job and derives,
at every sample:

* per layer: entropy S_l = n_l h_l (gaussian estimator), the work of the previous sampled
  update, and beta_l = Delta S_l / Delta E_l over the window, where Delta E_l is the layer's
  work summed over the window. A sample carries the work w+ of the previous sampled update
  (measured with the gradient of the step after it: docs/science.md section 2), and that w+
  stands for the `gap` steps between the two samples (an unbiased estimate of the
  work done over them). T_l = 1/beta_l carries a standard error and Fieller's interval from
  the Newey-West (co)variances of the window's per-sample increments of S_l and of the work,
  and is NaN unless that interval is bounded and excludes 0 (both sums significant at
  `physics.hac_critical`): in a stationary run it is mostly undefined. Where it is, the
  reading still says what is measurable: the entropy change and the layer's share of the work;
* for the job: S = sum_l S_l, and beta = (dS/dt) / (dE/dt) from least-squares slopes over
  the job's window (`JOB_WINDOWS` layer windows). Where the training loop gave no loss
  (zero-code instrumentation), the energy is the cumulative work sum_l sum_{s<t} w_{l,s}
  since the first sample (E_0 = 0): to first order it is E_t - E_0 (docs/science.md
  section 2), so slopes and temperatures keep their meaning; `Reading.energy_from_work` says
  which it is. The slope of the noisy minibatch energy is the
  "smoothed" energy change; T is defined where both slopes pass the same test, with its
  standard error and Fieller interval from the slopes' Newey-West (co)variances;
* per layer also, from the latest sample that took histograms, the histogram entropy (fixed
  edges, seeded subset), the negentropy J = h_gauss - h_hist (nats per value; how far the
  layer is from a Gaussian shape) and the share of its subset outside the edges;
* per activation site: eta = 1 - Var(a)/Var(z), and their distribution (the median, and the
  quantiles and extremes with their sites: `Reading.efficiency_quantiles`, `efficiency_extremes`);
  and its engine type from the latest scale probe, beside the function it applies and its
  input's RMS at that probe (the operating point the type belongs to), and the network's.

The agent uses it in-process (`Monitor.latest()`), the collector on merged samples.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

from . import physics
from . import saved as checked
from .stats import LayerInfo, Sample, SiteInfo

#: Samples per layer temperature window, the agent's and the collector's default alike.
WINDOW = 10
#: The saved names of a thermometer's histogram shape (`Thermometer._shape`), in its order.
_SHAPE = ("histogram_entropy", "negentropy", "outside")
#: The job's temperature window is this many layer windows long (50 samples by default). Its
#: energy is the minibatch loss, whose noise between batches dwarfs its change over 10 samples
#: (the job's T was defined in 19-29 % of a tiny Qwen2's learning readings over 10); a layer's
#: work is a difference on one batch, resolved over its 10 (docs/science.md section 4).
JOB_WINDOWS = 5


@dataclass(frozen=True)
class Reading:
    """Derived values at one sample. NaN means undefined (see `physics.temperature`)."""

    step: int
    wall_time: float
    energy: float
    entropy: float
    beta: float
    temperature: float
    temperature_stderr: float  # T's standard error (delta method); NaN where T is undefined
    efficiency: float  # the median site efficiency (NaN: no site has one); `efficiency_quantiles`
    layer_names: tuple[str, ...]
    layer_entropy: np.ndarray
    layer_work: np.ndarray
    layer_beta: np.ndarray
    layer_temperature: np.ndarray
    layer_temperature_stderr: np.ndarray  # NaN where the layer's T is undefined
    layer_histogram_entropy: np.ndarray  # n * h_hist (nats), comparable with layer_entropy
    layer_negentropy: np.ndarray  # h_gauss - h_hist, nats per value
    layer_outside: np.ndarray  # share of the histogram subset outside the edges
    site_names: tuple[str, ...]
    site_efficiency: np.ndarray
    site_engine: np.ndarray  # "A", "B" or "" (not probed yet)
    site_function: tuple[str, ...]  # what each site applies, with its parameters ("": not said)
    site_input_scale: np.ndarray  # RMS of each site's input at its last probe: where its type was read
    engine: str  # the network's engine type
    energy_from_work: bool = False  # energy is the cumulative work (no loss was given)
    # Defaults by factory, so that the class has no attribute of these names and a `_Deferred`
    # reading derives them when read. Fieller's 95 % interval for T where T is defined, else NaN
    # (docs/science.md section 4):
    temperature_low: float = field(default_factory=lambda: math.nan)
    temperature_high: float = field(default_factory=lambda: math.nan)
    # per layer, over the layer window: Fieller's interval for T; what is measurable where T is
    # not: the entropy change (nats) and the layer's share of the window's |work| (sum over
    # layers: 1). None only in a reading built by hand without them.
    layer_temperature_low: np.ndarray | None = field(default_factory=lambda: None)
    layer_temperature_high: np.ndarray | None = field(default_factory=lambda: None)
    layer_entropy_change: np.ndarray | None = field(default_factory=lambda: None)
    layer_work_share: np.ndarray | None = field(default_factory=lambda: None)

    @property
    def efficiency_quantiles(self) -> np.ndarray:
        """The sites' efficiencies at `physics.QUANTILES` (min, quartiles, median, max)."""
        return physics.efficiency_quantiles(self.site_efficiency)

    @property
    def efficiency_extremes(self) -> tuple[str, str]:
        """The sites of the lowest and the highest efficiency ("" where no site has one)."""
        eta = np.asarray(self.site_efficiency, dtype=np.float64)
        if not np.isfinite(eta).any():
            return "", ""
        return self.site_names[int(np.nanargmin(eta))], self.site_names[int(np.nanargmax(eta))]

    def __setstate__(self, state: dict) -> None:
        """Unpickle, giving a reading an older collector saved the standard errors it did not
        have: unknown (NaN)."""
        state.setdefault("temperature_stderr", math.nan)
        state.setdefault("layer_temperature_stderr", np.full(len(state["layer_names"]), np.nan))
        for name in _LAYER_INTERVALS:
            state.setdefault(name, np.full(len(state["layer_names"]), np.nan))
        state.setdefault("temperature_low", math.nan)
        state.setdefault("temperature_high", math.nan)
        state.setdefault("site_function", ("",) * len(state["site_names"]))
        state.setdefault("site_input_scale", np.full(len(state["site_names"]), np.nan))
        self.__dict__.update(state)

    def to_state(self) -> dict[str, Any]:
        """The reading as plain named values, one per field, as a saved state holds it (the
        names as arrays of strings; `from_state` reads it back)."""
        values = {f.name: getattr(self, f.name) for f in fields(Reading)}
        values["layer_names"] = np.array(list(self.layer_names), dtype=np.str_)
        values["site_names"] = np.array(list(self.site_names), dtype=np.str_)
        values["site_function"] = np.array(list(self.site_function), dtype=np.str_)
        return values

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Reading:
        """The reading `to_state` gave. A field the state lacks (saved before the field was
        added) is its default, else undefined: NaN, per layer (site) for a layer's (site's) values,
        "" for a site's function (as `__setstate__` gives the pickles of older releases). Fields it
        does not know are ignored."""
        kinds = {"step": int, "engine": str, "energy_from_work": bool}
        layer_names = checked.names(state["layer_names"], "reading.layer_names")
        site_names = checked.names(state["site_names"], "reading.site_names")
        values: dict[str, Any] = {"layer_names": layer_names, "site_names": site_names}
        for f in fields(cls):
            value = state.get(f.name)
            if f.name in values:
                continue
            if value is None and f.default is not MISSING:
                values[f.name] = f.default
            elif value is None and f.name == "site_function":
                values[f.name] = ("",) * len(state["site_names"])
            elif value is None:
                per = {"layer": layer_names, "site": site_names}.get(f.name.split("_")[0])
                values[f.name] = math.nan if per is None else np.full(len(per), np.nan)
            elif f.name == "site_function":
                functions = checked.array(value, (len(site_names),), "reading.site_function", "fU")
                values[f.name] = tuple(str(x) for x in functions)
            elif f.name.startswith(("layer_", "site_")):  # one value per layer (per site)
                n = len(layer_names if f.name.startswith("layer_") else site_names)
                values[f.name] = checked.array(value, (n,), f"reading.{f.name}", "fiubU")
            else:
                values[f.name] = kinds.get(f.name, float)(value)
        return cls(**values)


class Thermometer:
    """Windowed derivation for one job; feed it samples in step order.

    Its state is its own to save and restore (`to_state`, `from_state`: plain named values, the
    names a file format's, collector/state/schema.py stores them)."""

    def __init__(self, layers: list[LayerInfo], sites: list[SiteInfo], window: int = WINDOW) -> None:
        self.layer_names = tuple(layer.name for layer in layers)
        self.site_names = tuple(site.name for site in sites)
        self.site_functions = tuple(site.function for site in sites)
        self._lo = np.array([layer.hist_lo for layer in layers])
        self._hi = np.array([layer.hist_hi for layer in layers])
        self._begin(window)

    def _begin(self, window: int) -> None:
        """Hold no sample yet, in a layer window of `window` samples (the job's: `JOB_WINDOWS`
        times as long): a new thermometer of its layers and sites (and, for each field a saved
        state lacks, a restored one: `from_state`)."""
        if window < 2:
            raise ValueError(f"window must be at least 2 samples, got {window}")
        self._window = window
        longer = window * JOB_WINDOWS
        self._probe = np.full(len(self.site_names), -1.0)  # last probe spread per site
        self._scale = np.full(len(self.site_names), np.nan)  # each site's input RMS at its last probe
        nan = np.full(len(self.layer_names), np.nan)
        self._shapes = _Shapes((nan, nan, nan))  # h_hist, negentropy, outside share, from the last histogram
        self._steps: deque[int] = deque(maxlen=longer)
        self._energy: deque[float] = deque(maxlen=longer)
        self._entropy: deque[np.ndarray] = deque(maxlen=window)
        self._total: deque[np.float64] = deque(maxlen=longer)  # each entropy's sum, for the job's slope
        self._work: deque[np.ndarray] = deque(maxlen=window)  # cumulative work at each sample
        self._last: Sample | None = None
        self.latest: Reading | None = None
        self._engines = (self._probe.copy(), *_engines(self._probe))  # (probe, site types, network type)

    def grow_sites(self, sites: list[SiteInfo]) -> None:
        """Take a site table that grew (its sites first, then those that joined since: an MoE
        expert first given tokens later): the window goes on, the new sites not probed yet."""
        names = tuple(site.name for site in sites)
        if names[: len(self.site_names)] != self.site_names:
            raise ValueError("a grown site table must begin with the thermometer's sites")
        joined = len(names) - len(self.site_names)
        self._probe = np.concatenate([self._probe, np.full(joined, -1.0)])
        self._scale = np.concatenate([self._scale, np.full(joined, np.nan)])
        self._engines = (self._probe.copy(), *_engines(self._probe))
        self.site_names = names
        self.site_functions = tuple(site.function for site in sites)

    def __setstate__(self, state: dict) -> None:
        """Unpickle, giving a thermometer saved by an older collector (a job's state) the caches
        it did not keep."""
        if "_shape" in state:  # the shape itself, as a thermometer before `_Shapes` kept it
            state["_shapes"] = _Shapes(state.pop("_shape"))
        self.__dict__.update(state)
        if "_window" not in state:  # one window for the layers and the job, as before JOB_WINDOWS
            self._window = self._entropy.maxlen
            longer = self._window * JOB_WINDOWS
            self._steps, self._energy = deque(self._steps, longer), deque(self._energy, longer)
        if "_total" not in state:  # the job's window: the samples whose entropies it kept
            n, longer = len(self._entropy), self._steps.maxlen
            self._total = deque((e.sum() for e in self._entropy), maxlen=longer)
            self._steps = deque(list(self._steps)[len(self._steps) - n :], longer)
            self._energy = deque(list(self._energy)[len(self._energy) - n :], longer)
        if "_engines" not in state:
            self._engines = (self._probe.copy(), *_engines(self._probe))
        if "_scale" not in state:
            self._scale = np.full(len(self.site_names), np.nan)
        if "site_functions" not in state:
            self.site_functions = ("",) * len(self.site_names)

    def to_state(self) -> dict[str, Any]:
        """What the thermometer carries from one sample to the next, as plain named values: its
        layer window's length and samples (steps, energies, entropies and their sums, cumulative
        work), its layers' and sites' names, the histogram edges, the last probes and
        histogram shape, the last sample and the latest reading (their own `to_state`; absent
        when None). A snapshot: no array in it changes as the thermometer carries on.

        The names are a file format's (collector/state/schema.py stores them under `thermometer.`):
        renaming an attribute changes this method and `from_state`, never a name. A field added
        later is read with a default (see `from_state`), so it needs no new format."""
        n = len(self.layer_names)
        h_hist, negentropy, outside = self._shape
        return {
            "window": self._window,
            "layer_names": np.array(list(self.layer_names), dtype=np.str_),
            "site_names": np.array(list(self.site_names), dtype=np.str_),
            "site_functions": np.array(list(self.site_functions), dtype=np.str_),
            "hist_lo": self._lo,
            "hist_hi": self._hi,
            "probe": self._probe,
            "probe_scale": self._scale,
            "histogram_entropy": h_hist,
            "negentropy": negentropy,
            "outside": outside,
            "steps": np.array(self._steps, dtype=np.int64),
            "energy": np.array(self._energy, dtype=np.float64),
            "entropy": np.array(self._entropy, dtype=np.float64).reshape(len(self._entropy), n),
            "entropy_total": np.array(self._total, dtype=np.float64),
            "work": np.array(self._work, dtype=np.float64).reshape(len(self._work), n),
            "last": None if self._last is None else self._last.to_state(),
            "latest": None if self.latest is None else self.latest.to_state(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Thermometer:
        """The thermometer `to_state` saved, carrying on to the bit as it would have.

        Its window, names and edges are required; any other field the state lacks (saved before
        the field was added) is what a new thermometer of those layers holds (`_begin`). A
        field it does not know (saved by a later release) is ignored (collector/state/schema.py says
        why)."""
        t = cls.__new__(cls)
        t.layer_names = checked.names(state["layer_names"], "thermometer.layer_names")
        t.site_names = checked.names(state["site_names"], "thermometer.site_names")
        n, sites = len(t.layer_names), len(t.site_names)
        t.site_functions = ("",) * sites  # saved before sites said their function
        t._lo = checked.array(state["hist_lo"], (n,), "thermometer.hist_lo")
        t._hi = checked.array(state["hist_hi"], (n,), "thermometer.hist_hi")
        window = checked.count(state["window"], "thermometer.window", 2, checked.MOST // max(n, 1))
        t._begin(window)
        v = {**t.to_state(), **state}
        longer = t._steps.maxlen  # the job's window (`JOB_WINDOWS` layer windows)
        functions = checked.array(v["site_functions"], (sites,), "thermometer.site_functions", "fU")
        t.site_functions = tuple(str(x) for x in functions)
        t._probe = checked.array(v["probe"], (sites,), "thermometer.probe")
        t._scale = checked.array(v["probe_scale"], (sites,), "thermometer.probe_scale")
        t._shape = tuple(checked.array(v[k], (n,), f"thermometer.{k}") for k in _SHAPE)  # type: ignore[assignment]
        steps = checked.array(v["steps"], (-1,), "thermometer.steps", "iu")
        k = len(steps)
        if k > longer:
            raise ValueError(f"thermometer.steps: {k} samples, more than its window of {longer}")
        t._steps = deque(steps.tolist(), maxlen=longer)
        t._energy = deque(checked.array(v["energy"], (k,), "thermometer.energy").tolist(), maxlen=longer)
        entropy = checked.array(v["entropy"], (-1, n), "thermometer.entropy")
        kept = len(entropy)  # the layers' window: its last `window` samples
        if kept > min(k, window):
            raise ValueError(f"thermometer.entropy: {kept} samples, more than its window of {window}")
        t._entropy = deque(list(entropy), maxlen=window)
        t._total = deque(
            list(checked.array(v["entropy_total"], (k,), "thermometer.entropy_total")), maxlen=longer
        )
        t._work = deque(list(checked.array(v["work"], (kept, n), "thermometer.work")), maxlen=window)
        t._last = None if v["last"] is None else Sample.from_state(v["last"], layers=n, sites=sites)
        t.latest = None if v["latest"] is None else Reading.from_state(v["latest"])
        if t.latest is not None and (t.latest.layer_names, t.latest.site_names) != (
            t.layer_names,
            t.site_names,
        ):
            raise ValueError("thermometer.latest: a reading of other layers or sites than the thermometer's")
        t._engines = (t._probe.copy(), *_engines(t._probe))
        return t

    def update(self, sample: Sample) -> Reading:
        """Add one sample (a step after the previous one) and return the new reading."""
        self.latest = self.add(sample).complete()
        return self.latest

    def add(self, sample: Sample) -> Reading:
        """`update`, for a caller that reads few of its readings (the collector: a scrape, a
        checkpoint or its history reads a job's reading about once a second, while its steps
        merge many times a second): what the window's next samples and the phase detector need
        (energy, entropies, cumulative work, probe types; the last histograms' rows) is
        worked out now, the rest of the reading (temperatures, efficiencies, the histograms'
        entropies and shares: most of the cost) when first read (`_Deferred`)."""
        prev = self._last
        if prev is not None and sample.step <= prev.step:
            raise ValueError(f"sample for step {sample.step} after step {prev.step}")
        layers = sample.layers
        work = layers.work
        # physics.layer_entropy, keeping h_gauss for the histogram's negentropy
        h_gauss = physics.gaussian_entropy(physics.variance(layers.count, layers.mean, layers.m2))
        floored = np.asarray(layers.count, dtype=np.float64) * h_gauss
        total = np.add.reduce(floored)  # the job's sum keeps a floored layer's floor: it stays continuous
        entropy = np.where(physics.at_floor(layers.count, layers.mean, layers.m2), np.nan, floored)
        if prev is None:
            cumulative = np.zeros(len(layers))
        else:
            cumulative = self._work[-1] + work * (sample.step - prev.step)
        energy = sample.energy if sample.has_energy else float(np.add.reduce(cumulative))
        self._steps.append(sample.step)
        self._energy.append(energy)
        self._entropy.append(entropy)
        self._total.append(total)
        self._work.append(cumulative)
        self._last = sample

        sites = sample.sites
        probe = sites.probe_spread
        if (probe >= 0).any():  # the operating point each probe read its type at: the input's RMS
            rms = np.sqrt(sites.in_mean * sites.in_mean + physics.site_variance(sites.count, sites.in_m2))
            self._scale = np.where(probe >= 0, rms, self._scale)
        self._probe = np.where(probe >= 0, probe, self._probe)
        if not np.array_equal(self._probe, self._engines[0]):  # probes are rare: their types are kept
            self._engines = (self._probe.copy(), *_engines(self._probe))
        _, site_engine, engine = self._engines
        if layers.histogram is not None:  # a row of zeros: that layer's histogram was not taken
            self._shapes = self._shapes.taking(layers.histogram, h_gauss, self._lo, self._hi)
        window = _Window(
            tuple(self._steps), tuple(self._energy), tuple(self._entropy), tuple(self._total),
            tuple(self._work), sample, self._shapes, self._lo, self._hi,
        )  # fmt: skip
        self.latest = _Deferred.of(
            window,
            step=sample.step,
            wall_time=sample.wall_time,
            energy=energy,
            entropy=float(total),
            layer_names=self.layer_names,
            layer_entropy=entropy,
            layer_work=work,
            site_names=self.site_names,
            site_engine=site_engine,
            site_function=self.site_functions,
            site_input_scale=self._scale,
            engine=engine,
            energy_from_work=not sample.has_energy,
        )
        return self.latest

    @property
    def _shape(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each layer's histogram entropy, negentropy and outside share, from the last
        histogram that took it (NaN: none did). Worked out when read (`_Shapes`)."""
        shape = self._shapes.values(self._lo, self._hi)
        self._shapes = _Shapes(shape)
        return shape

    @_shape.setter
    def _shape(self, shape: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        self._shapes = _Shapes(shape)


@dataclass(frozen=True, eq=False)
class _Shapes:
    """The layers' histogram shape (`Thermometer._shape`) as the histograms since it was last
    worked out left it: `known`, and for the layers a later histogram took, that histogram's
    row and the layer's Gaussian entropy per value at its step (the negentropy's other term).

    A histogram's entropy, negentropy and outside share are per row, so those of the rows
    kept here are, to the bit, the values each histogram's step would have computed; keeping
    the rows costs three `np.where` a histogram, working them out most of a reading's cost."""

    known: tuple[np.ndarray, np.ndarray, np.ndarray]
    rows: np.ndarray | None = None  # (layers, bins + 2): the last histogram row of each layer taken
    h_gauss: np.ndarray | None = None  # each such layer's h_gauss at that histogram's step
    taken: np.ndarray | None = None  # the layers a histogram took since `known`

    def taking(self, histogram: np.ndarray, h_gauss: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> _Shapes:
        """With one more histogram (a row of zeros: that layer's was not taken)."""
        taken = histogram.any(axis=1)
        if self.rows is None:
            return _Shapes(self.known, histogram, h_gauss, taken)
        if self.rows.shape != histogram.shape:  # other bins (a job whose ranks all left, then others)
            return _Shapes(self.values(lo, hi), histogram, h_gauss, taken)
        return _Shapes(
            self.known,
            np.where(taken[:, None], histogram, self.rows),
            np.where(taken, h_gauss, self.h_gauss),
            taken | self.taken,
        )

    def values(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(histogram entropy, negentropy, outside share) of every layer; worked out once (a
        reading and a checkpoint may share them), on any thread."""
        if self.rows is None:
            return self.known
        done = self.__dict__.get("_values")
        if done is None:
            h_hist = physics.histogram_entropy(self.rows, lo, hi)
            shape = (h_hist, self.h_gauss - h_hist, physics.outside_fraction(self.rows))
            pairs = zip(shape, self.known, strict=True)
            done = tuple(np.where(self.taken, new, old) for new, old in pairs)
            self.__dict__["_values"] = done
        return done


@dataclass(frozen=True, eq=False)
class _Window:
    """What a thermometer held at one sample that its reading's deferred values need: the window's
    steps, energies, entropies (per layer and their sums), cumulative work, the sample itself,
    and the histogram shape (with the layers' histogram edges). Tuples and arrays that no
    later sample changes, so a reading can be derived from them on any thread, at any time
    after."""

    steps: tuple[int, ...]
    energy: tuple[float, ...]
    entropy: tuple[np.ndarray, ...]
    total: tuple[np.float64, ...]
    work: tuple[np.ndarray, ...]
    sample: Sample
    shapes: _Shapes
    lo: np.ndarray
    hi: np.ndarray

    def derive(self) -> dict[str, object]:
        """The deferred values of the reading (`_DEFERRED_FIELDS`)."""
        count = self.sample.layers.count
        layers = self._layer_temperature(count)
        beta, temp, temp_err, temp_low, temp_high = self._job_temperature()
        sites = self.sample.sites
        eta = physics.site_efficiency(
            physics.site_variance(sites.count, sites.in_m2), physics.site_variance(sites.count, sites.out_m2)
        )
        h_hist, negentropy, outside = self.shapes.values(self.lo, self.hi)
        return {
            "beta": beta,
            "temperature": temp,
            "temperature_stderr": temp_err,
            "temperature_low": temp_low,
            "temperature_high": temp_high,
            "efficiency": float(physics.efficiency_quantiles(eta)[physics.QUANTILES.index(0.5)]),
            **layers,
            "layer_histogram_entropy": count * h_hist,
            "layer_negentropy": negentropy,
            "layer_outside": outside,
            "site_efficiency": eta,
        }

    def _layer_temperature(self, count: np.ndarray) -> dict[str, np.ndarray]:
        """Each layer's beta, T, T's standard error and Fieller interval over the layer window (its
        last `len(self.entropy)` samples), from the per-sample increments of its entropy and of
        its (gap-weighted) work with their Newey-West (co)variances; and what is measurable where
        T is not: the entropy change and the layer's share of the window's |work|.

        T is defined where Fieller's interval for T = dE/dS is bounded (the entropy change is
        significant) and excludes 0 (the work is): both sums farther from 0 than
        `physics.hac_critical` times their standard error, and than float resolution."""
        n = len(self.entropy)
        steps = np.asarray(self.steps[-n:])
        ds, de, var_s, var_e, cov = physics.window_changes(_rows(self.entropy), _rows(self.work), steps)
        crit = physics.hac_critical(n - 1, n - 2)
        beta, temp = physics.temperature(
            ds,
            de,
            entropy_floor=np.maximum(crit * np.sqrt(var_s), physics.ENTROPY_RESOLUTION * count),
            energy_floor=np.maximum(crit * np.sqrt(var_e), physics.WORK_RESOLUTION),
        )
        err, low, high = (np.full(len(temp), np.nan) for _ in range(3))
        if (defined := np.flatnonzero(~np.isnan(temp))).size:
            d = (ds[defined], de[defined], var_s[defined], var_e[defined], cov[defined])
            err[defined] = physics.temperature_stderr(*d)
            low[defined], high[defined] = physics.fieller(d[1], d[0], d[3], d[2], d[4], crit)
        magnitude = np.abs(de)
        total = float(np.add.reduce(magnitude))
        return {
            "layer_beta": beta,
            "layer_temperature": temp,
            "layer_temperature_stderr": err,
            "layer_temperature_low": low,
            "layer_temperature_high": high,
            "layer_entropy_change": ds,
            "layer_work_share": magnitude / total if total > 0 else np.full(len(temp), np.nan),
        }

    def _job_temperature(self) -> tuple[float, float, float, float, float]:
        """Job beta, T, T's standard error and Fieller interval from the least-squares slopes of S
        and E against step over the job's window, with their Newey-West (co)variances
        (`physics.slope_covariance`); T is defined, as a layer's, where both slopes are farther from 0
        than `physics.hac_critical` times their standard error (the entropy's also than float
        resolution)."""
        nan = math.nan
        steps = np.asarray(self.steps, dtype=np.float64)
        energy = np.asarray(self.energy, dtype=np.float64)
        known = np.isfinite(energy)
        if np.count_nonzero(known) < 3:
            return nan, nan, nan, nan, nan
        steps, total, energy = steps[known], np.asarray(self.total)[known], energy[known]
        ds, _ = physics.slope(steps, total)
        de, _ = physics.slope(steps, energy)
        span = float(steps[-1] - steps[0])
        var_s = physics.slope_covariance(steps, total, total) * span * span
        var_e = physics.slope_covariance(steps, energy, energy) * span * span
        crit = physics.hac_critical(len(steps), len(steps) - 2)
        count = float(np.add.reduce(self.sample.layers.count))
        beta, temp = physics.temperature(
            ds * span,
            de * span,
            entropy_floor=max(crit * math.sqrt(var_s), physics.ENTROPY_RESOLUTION * count),
            energy_floor=crit * math.sqrt(var_e),
        )
        if math.isnan(temp):
            return float(beta), nan, nan, nan, nan
        cov = physics.slope_covariance(steps, total, energy) * span * span
        changes = (ds * span, de * span, var_s, var_e, cov)
        err = physics.temperature_stderr(*changes)
        low, high = physics.fieller(de * span, ds * span, var_e, var_s, cov, crit)
        return float(beta), float(temp), float(err), float(low), float(high)


#: The fields of a `Reading` derived only when one of them is first read (`_Deferred`).
_DEFERRED_FIELDS = frozenset(
    (
        "beta",
        "temperature",
        "temperature_stderr",
        "efficiency",
        "layer_beta",
        "layer_temperature",
        "layer_temperature_stderr",
        "temperature_low",
        "temperature_high",
        "layer_temperature_low",
        "layer_temperature_high",
        "layer_entropy_change",
        "layer_work_share",
        "layer_histogram_entropy",
        "layer_negentropy",
        "layer_outside",
        "site_efficiency",
    )
)


class _Deferred(Reading):
    """A `Reading` whose temperatures, efficiencies and histogram entropies are derived when one
    of them is first read, from the `_Window` of its sample.

    A collector merges a job's step many times a second but reads its reading at a scrape, at
    a checkpoint or into its history (about once a second); what the detector reads of every
    step (the energy and entropies) is set at once. The derivation is what `update` computed
    before, from the same arrays, so the values are the same to the bit, whenever and on
    whichever thread they are read (the metrics thread reads readings): the window holds
    nothing a later sample changes, and the values go into the reading whole. Pickled or
    copied, it is a plain `Reading`.
    """

    @classmethod
    def of(cls, window: _Window, **values: object) -> _Deferred:
        reading = object.__new__(cls)
        reading.__dict__.update(values, _window=window)
        return reading

    def __getattr__(self, name: str) -> object:  # only for what is not set: the deferred fields
        if name not in _DEFERRED_FIELDS:
            raise AttributeError(name)
        window = self.__dict__.get("_window")
        if window is not None:
            self.__dict__.update(window.derive())
            self.__dict__.pop("_window", None)
        return self.__dict__[name]

    def complete(self) -> Reading:
        """The plain `Reading` of the same values, every one derived."""
        return Reading(*(getattr(self, f.name) for f in fields(Reading)))

    def __reduce__(self) -> tuple[type[Reading], tuple[object, ...]]:
        return Reading, tuple(getattr(self, f.name) for f in fields(Reading))


#: A reading's per-layer fields older releases did not save: unknown (NaN) when restored.
_LAYER_INTERVALS = (
    "layer_temperature_low",
    "layer_temperature_high",
    "layer_entropy_change",
    "layer_work_share",
)


def _engines(probe: np.ndarray) -> tuple[np.ndarray, str]:
    """Each site's engine type and the network's, from the last probe spreads."""
    site_engine = physics.engine_type(probe)
    return site_engine, physics.network_engine_type(site_engine)


def _rows(window: deque[np.ndarray]) -> np.ndarray:
    """np.stack of the window's equal-length rows, the same array at half its cost (np.stack's
    Python checks are most of it for ten rows of a few hundred values; a thermometer stacks two
    windows at every merged step)."""
    return np.concatenate(window).reshape(len(window), -1)
