"""Findings: what is wrong, where, from a job's merged samples (docs/findings.md), pure numpy.

`Findings.update` takes each merged `Sample` with its `Reading` (for the layer and site names and
what each site applies) and returns the findings it raised and cleared. Every rule is a per-layer
(per-site) condition on one sample's statistics that must hold for `RAISE_AFTER` samples in a row
to raise and fail for `CLEAR_AFTER` in a row to clear: the conditions are far from where a
healthy layer's statistics go (orders of magnitude, or bit-identity), so one sample's chance to
meet one by noise is small, and the run of samples multiplies it down (docs/findings.md gives each
rule's statistic and false-alarm bound). A condition that cannot be read (a NaN, a column an older
agent does not send) neither raises nor clears.

Rules (the names are the contract's):

* `dead_site`: a non-saturating site whose output variance is under `DEAD_GAIN` of its input's
  and whose output mean is within `DEAD_MEAN` input standard deviations of 0 (a ReLU whose
  inputs are all negative passes exactly 0).
* `saturated_site`: a tanh/sigmoid/hardtanh-like site whose gain Var(out) / (Var(in) s0^2), s0
  its slope at 0, is under `SATURATED_GAIN` (a tanh at input scale 1 reads 0.39, at 3: 0.09).
* `frozen_layer`: a layer whose moments (count, mean, M2) are bit-identical to the previous
  sample's and whose work is 0 (or unread), while another layer moved; a layer that never moved
  since its first sample (frozen on purpose, from the start) is never raised, nor one while a
  `dead_site` holds (a dead ReLU zeroes the gradient of the layers around it: it is the cause).
* `vanishing_gradient` / `exploding_update`: from the layer's update-to-weight ratio
  r = sqrt(update_sq / sum theta^2) (`LayerStats.update_sq`, absent from older agents: unknown),
  in decades against its own exponentially weighted baseline (learned over `WARMUP` samples and
  then only while no finding holds, so warmup and decay move the baseline, not the finding):
  `VANISH_DECADES` below, or `EXPLODE_DECADES` above and `EXPLODE_SIGMAS` of its own scatter
  (a vanishing update is not raised while a `dead_site` holds: the site is the cause).
  Where at least half the layers with a ratio jump at once, the cause is job-wide (a learning
  rate raised for all): one `exploding_update` of scope `job`.
* `nonfinite`: a rank's row of a layer or site that carried NaN/Inf (the wire NaN-s the row):
  raised at once, naming the rank; cleared when that rank's row is finite again.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import saved as checked
from .stats import Sample

#: The finding names (the contract's, in the order docs/findings.md lists them).
NAMES = (
    "dead_site",
    "saturated_site",
    "frozen_layer",
    "vanishing_gradient",
    "exploding_update",
    "divergence_warning",
    "nonfinite",
    "rank_outlier",
)
#: Samples in a row a condition must hold to raise its finding, and fail to clear it.
RAISE_AFTER = 3
CLEAR_AFTER = 3
#: dead_site: output variance under this share of the input's, mean within this many input stds of 0.
DEAD_GAIN = 1e-6
DEAD_MEAN = 1e-3
#: saturated_site: gain under this (see the module docstring).
SATURATED_GAIN = 0.1
#: A site finding clears when its gain is this many times past its bound (hysteresis).
CLEAR_FACTOR = 2.0
#: Saturating functions, by a name their site's `function` (or kind) contains, with their slope at 0.
SATURATING = (("hardsigmoid", 1 / 6), ("sigmoid", 0.25), ("hardtanh", 1.0), ("tanh", 1.0), ("softsign", 1.0))
#: Functions whose names contain a saturating one's but that do not saturate on both sides.
NOT_SATURATING = ("tanhshrink", "logsigmoid")
#: The update-ratio baseline: samples it learns from before judging, its EWMA weight.
WARMUP = 5
BASELINE_WEIGHT = 0.2
#: Decades below (vanishing) or above (exploding) the baseline, and sigmas of its scatter above.
VANISH_DECADES = 3.0
EXPLODE_DECADES = 0.7
EXPLODE_SIGMAS = 6.0
#: Share of the layers with a ratio that jump together for the cause to be the job's.
JOB_WIDE = 0.5


@dataclass
class Finding:
    """One finding: `scope` "site", "layer" or "job" (`layer` "" then), raised at `step`, cleared
    at `cleared` (None while it holds); what raised it (`statistic`, its `value`), `confidence`
    in (0.5, 1), and the `rank` it was seen on (-1: the merged job)."""

    finding: str
    scope: str
    layer: str
    step: int
    time: float
    statistic: str
    value: float
    confidence: float
    rank: int = -1
    cleared: int | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.finding, self.scope, self.layer)


_COLUMNS = tuple(f.name for f in fields(Finding))


def slope_at_zero(function: str) -> float:
    """s0 of a saturating function (by its name), 0.0 for any other."""
    name = function.lower()
    if any(key in name for key in NOT_SATURATING):
        return 0.0
    return next((s0 for key, s0 in SATURATING if key in name), 0.0)


class _Streaks:
    """Per entity, how many samples in a row a condition held (`on`) and failed (`off`)."""

    def __init__(self, n: int) -> None:
        self.on = np.zeros(n, dtype=np.int64)
        self.off = np.zeros(n, dtype=np.int64)

    def update(self, hit: np.ndarray, known: np.ndarray) -> None:
        """`hit` where the condition held, of the entities whose condition could be read (`known`)."""
        held, miss = hit & known, known & ~hit
        self.on[held] += 1
        self.on[miss] = 0
        self.off[miss] += 1
        self.off[held] = 0


class Findings:
    """A job's findings, online, one merged sample at a time; its state saved by itself."""

    def __init__(self) -> None:
        self.layer_names: tuple[str, ...] = ()
        self.site_names: tuple[str, ...] = ()
        self.active: dict[tuple[str, str, str], Finding] = {}
        self.totals: Counter[str] = Counter()
        self._reset_layers(0)
        self._reset_sites(0)

    def _reset_layers(self, n: int) -> None:
        self._prev: np.ndarray | None = None  # (3, n): count, mean, m2 of the previous sample
        self._moved = np.zeros(n, dtype=bool)  # the layer moved since its first sample
        self._frozen = _Streaks(n)
        self._seen = np.zeros(n, dtype=np.int64)  # samples with a ratio
        self._base = np.full(n, np.nan)  # EWMA of log10 r
        self._base_var = np.zeros(n)  # EW variance of log10 r
        self._vanish = _Streaks(n)
        self._explode = _Streaks(n)

    def _reset_sites(self, n: int) -> None:
        self._functions: tuple[str, ...] | None = None  # a cache of `_slopes`, not state
        self._s0 = np.zeros(0)
        self._dead = _Streaks(n)
        self._saturated = _Streaks(n)

    def update(
        self,
        sample: Sample,
        layer_names: Sequence[str],
        site_names: Sequence[str],
        site_functions: Sequence[str],
        nonfinite: Iterable[tuple[int, str, str]] = (),
    ) -> list[Finding]:
        """The findings this sample raised and cleared (cleared ones with `cleared` set; a raised
        one is the object that holds, and clears in place: keep a copy to keep it as raised).
        `nonfinite`: (rank, scope, name) of the rows ranks sent non-finite at this step."""
        if tuple(layer_names) != self.layer_names:
            self.layer_names = tuple(layer_names)
            self._reset_layers(len(layer_names))
        if tuple(site_names) != self.site_names:
            self.site_names = tuple(site_names)
            self._reset_sites(len(site_names))
        changed: list[Finding] = []
        self._sites(sample, site_functions, changed)
        self._layers(sample, changed)
        self._nonfinite(sample, set(nonfinite), changed)
        return changed

    # -- the rules ------------------------------------------------------------------------------

    def _sites(self, sample: Sample, functions: Sequence[str], out: list[Finding]) -> None:
        s = sample.sites
        if len(s) != len(self.site_names):
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.maximum(s.count, 1)
            in_var, out_var = s.in_m2 / n, s.out_m2 / n
            gain = out_var / in_var
            s0 = self._slopes(functions, len(s))
            known = (s.count > 0) & np.isfinite(gain) & (in_var > 0)
            dead = known & (s0 == 0) & (gain < DEAD_GAIN) & (np.abs(s.out_mean) < DEAD_MEAN * np.sqrt(in_var))
            sat_gain = gain / np.where(s0 > 0, s0, 1.0) ** 2
            saturated = known & (s0 > 0) & (sat_gain < SATURATED_GAIN)
        # hysteresis: a finding clears only well past its bound (a gain hovering at it does not flap)
        self._dead.update(dead, (dead | (gain > CLEAR_FACTOR * DEAD_GAIN)) & known & (s0 == 0))
        self._judge("dead_site", "site", self.site_names, self._dead, "site_gain", gain, sample, out)
        self._saturated.update(
            saturated, (saturated | (sat_gain > CLEAR_FACTOR * SATURATED_GAIN)) & known & (s0 > 0)
        )
        self._judge(
            "saturated_site", "site", self.site_names, self._saturated, "site_gain", sat_gain, sample, out
        )

    def _slopes(self, functions: Sequence[str], n: int) -> np.ndarray:
        """s0 of each site's function, worked out again only when the functions change."""
        if functions != self._functions:
            self._functions = tuple(functions)
            self._s0 = np.array([slope_at_zero(f) for f in self._functions], dtype=np.float64)
        return self._s0[:n] if len(self._s0) >= n else np.append(self._s0, np.zeros(n - len(self._s0)))

    def _layers(self, sample: Sample, out: list[Finding]) -> None:
        layers = sample.layers
        if len(layers) != len(self.layer_names):
            return
        now = np.stack([layers.count.astype(np.float64), layers.mean, layers.m2])
        finite = np.isfinite(now).all(axis=0)
        if self._prev is not None:
            same = (now == self._prev).all(axis=0) & finite
            self._moved |= ~same & finite & np.isfinite(self._prev).all(axis=0)
            work = layers.work
            idle = ~np.isfinite(work) | (work == 0)
            frozen = same & idle & self._moved
            learning = bool((~same & finite).any())  # another layer moved: the job still learns
            # a dead site stops the gradient of the layers around it: the site is the cause
            dead = any(k[0] == "dead_site" for k in self.active)
            self._frozen.update(frozen & (not dead), finite & learning)
            self._judge(
                "frozen_layer",
                "layer",
                self.layer_names,
                self._frozen,
                "moments_unchanged_samples",
                self._frozen.on.astype(np.float64),
                sample,
                out,
            )
        self._prev = now
        self._ratios(sample, out)

    def _ratios(self, sample: Sample, out: list[Finding]) -> None:
        layers = sample.layers
        update_sq = getattr(layers, "update_sq", None)
        if update_sq is None:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            weight_sq = layers.m2 + layers.count * layers.mean**2
            log_r = 0.5 * np.log10(np.asarray(update_sq, dtype=np.float64) / weight_sq)
        known = np.isfinite(log_r)
        judged = known & (self._seen >= WARMUP)
        excess = log_r - self._base
        scatter = np.sqrt(self._base_var)
        vanish = judged & (excess < -VANISH_DECADES)
        explode = judged & (excess > EXPLODE_DECADES) & (excess > EXPLODE_SIGMAS * scatter)
        n_known = int(judged.sum())
        job_wide = n_known > 1 and explode.sum() >= JOB_WIDE * n_known
        # a dead site stops the gradient of the layers around it: the site is the cause (as frozen)
        dead = any(k[0] == "dead_site" for k in self.active)
        self._vanish.update(vanish & (not dead), judged)
        self._judge(
            "vanishing_gradient",
            "layer",
            self.layer_names,
            self._vanish,
            "update_ratio_decades",
            excess,
            sample,
            out,
        )
        if job_wide:
            self._explode.update(np.zeros_like(explode), judged)  # the job's, not each layer's
            value = float(np.nanmedian(excess[explode]))
            self._raise_once("exploding_update", "job", "", "update_ratio_decades", value, sample, out)
        else:
            self._explode.update(explode, judged)
            self._clear_if("exploding_update", "job", "", sample, out)
        self._judge(
            "exploding_update",
            "layer",
            self.layer_names,
            self._explode,
            "update_ratio_decades",
            excess,
            sample,
            out,
            after=1,
        )
        # the baseline learns where no finding holds (warmup and decay move it, not a finding)
        learn = known & (self._vanish.on == 0) & (self._explode.on == 0) & ~(explode & job_wide)
        first = learn & ~np.isfinite(self._base)
        w = np.where(self._seen < WARMUP, 1.0 / (self._seen + 1), BASELINE_WEIGHT)
        d = np.where(learn, log_r - np.where(first, log_r, self._base), 0.0)
        self._base = np.where(first, log_r, np.where(learn, self._base + w * d, self._base))
        self._base_var = np.where(learn & ~first, (1 - w) * (self._base_var + w * d * d), self._base_var)
        self._seen += learn

    def _nonfinite(self, sample: Sample, rows: set[tuple[int, str, str]], out: list[Finding]) -> None:
        held = {(f.rank, f.scope, f.layer) for k, f in self.active.items() if k[0] == "nonfinite"}
        for rank, scope, name in sorted(rows - held):
            f = Finding(
                "nonfinite",
                scope,
                name,
                sample.step,
                sample.wall_time,
                "nonfinite_row",
                math.nan,
                0.999,
                rank,
            )
            self._hold(f, out)
        for rank, scope, name in held - rows:
            f = self.active.pop(("nonfinite", scope, name))
            if f.rank == rank:
                f.cleared = sample.step
                out.append(f)
            else:
                self.active[f.key] = f

    # -- raising and clearing -------------------------------------------------------------------

    def _judge(
        self,
        name: str,
        scope: str,
        names: Sequence[str],
        streaks: _Streaks,
        statistic: str,
        values: np.ndarray,
        sample: Sample,
        out: list[Finding],
        after: int = RAISE_AFTER,
    ) -> None:
        """Raise `name` where its condition held `after` samples in a row, clear it where it
        failed `CLEAR_AFTER` samples in a row."""
        for i in np.flatnonzero(streaks.on >= after):
            if (name, scope, names[i]) not in self.active:
                confidence = 1.0 - 0.5 ** (int(streaks.on[i]) + 1)
                f = Finding(
                    name,
                    scope,
                    names[i],
                    sample.step,
                    sample.wall_time,
                    statistic,
                    float(values[i]),
                    confidence,
                )
                self._hold(f, out)
        held = [k[2] for k in self.active if k[0] == name and k[1] == scope]  # few: not every entity
        if held:
            index = {n: i for i, n in enumerate(names)} if len(held) > 8 else None
            for layer in held:
                i = index[layer] if index is not None else names.index(layer)
                if streaks.off[i] >= CLEAR_AFTER:
                    self._clear_if(name, scope, layer, sample, out)

    def _raise_once(
        self,
        name: str,
        scope: str,
        layer: str,
        statistic: str,
        value: float,
        sample: Sample,
        out: list[Finding],
    ) -> None:
        if (name, scope, layer) not in self.active:
            self._hold(
                Finding(name, scope, layer, sample.step, sample.wall_time, statistic, value, 0.99), out
            )

    def _hold(self, f: Finding, out: list[Finding]) -> None:
        self.active[f.key] = f
        self.totals[f.finding] += 1
        out.append(f)

    def _clear_if(self, name: str, scope: str, layer: str, sample: Sample, out: list[Finding]) -> None:
        f = self.active.pop((name, scope, layer), None)
        if f is not None:
            f.cleared = sample.step
            out.append(f)

    # -- state ----------------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """What carries from one sample to the next, as plain named values (collector/state/
        schema.py stores them under `findings.`); a field added later is read with a default."""
        active = list(self.active.values())
        streaks = {
            "frozen": self._frozen,
            "vanish": self._vanish,
            "explode": self._explode,
            "dead": self._dead,
            "saturated": self._saturated,
        }
        return {
            "layer_names": np.array(list(self.layer_names), dtype=np.str_),
            "site_names": np.array(list(self.site_names), dtype=np.str_),
            "active": {
                c: np.array(
                    [-1 if (v := getattr(f, c)) is None else v for f in active],
                    dtype=np.str_ if c in ("finding", "scope", "layer", "statistic") else None,
                )
                for c in _COLUMNS
            },
            "totals": {
                "finding": np.array(list(self.totals), dtype=np.str_),
                "count": np.array(list(self.totals.values()), dtype=np.int64),
            },
            "previous": None if self._prev is None else self._prev.copy(),
            "moved": self._moved.copy(),
            "seen": self._seen.copy(),
            "base": self._base.copy(),
            "base_var": self._base_var.copy(),
            **{f"{k}_on": s.on.copy() for k, s in streaks.items()},
            **{f"{k}_off": s.off.copy() for k, s in streaks.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Findings:
        """The findings `to_state` saved (ValueError where its arrays do not fit together)."""
        f = cls()
        f.layer_names = checked.names(state["layer_names"], "layer_names")
        f.site_names = checked.names(state["site_names"], "site_names")
        n, m = len(f.layer_names), len(f.site_names)
        f._reset_layers(n)
        f._reset_sites(m)
        a = state.get("active", {})
        k = len(a.get("finding", ()))
        for i in range(k):
            row = {c: a[c][i] for c in _COLUMNS}
            found = Finding(
                str(row["finding"]),
                str(row["scope"]),
                str(row["layer"]),
                int(row["step"]),
                float(row["time"]),
                str(row["statistic"]),
                float(row["value"]),
                float(row["confidence"]),
                int(row["rank"]),
                None if int(row["cleared"]) < 0 else int(row["cleared"]),
            )
            f.active[found.key] = found
        t = state.get("totals", {})
        f.totals = Counter(
            {str(a): int(b) for a, b in zip(t.get("finding", ()), t.get("count", ()), strict=True)}
        )
        previous = state.get("previous")
        f._prev = None if previous is None else checked.array(previous, (3, n), "previous").astype(np.float64)
        f._moved = checked.array(state.get("moved", f._moved), (n,), "moved").astype(bool)
        f._seen = checked.array(state.get("seen", f._seen), (n,), "seen").astype(np.int64)
        f._base = checked.array(state.get("base", f._base), (n,), "base").astype(np.float64)
        f._base_var = checked.array(state.get("base_var", f._base_var), (n,), "base_var").astype(np.float64)
        for key, streaks, size in (
            ("frozen", f._frozen, n),
            ("vanish", f._vanish, n),
            ("explode", f._explode, n),
            ("dead", f._dead, m),
            ("saturated", f._saturated, m),
        ):
            streaks.on = checked.array(state.get(f"{key}_on", streaks.on), (size,), f"{key}_on").astype(
                np.int64
            )
            streaks.off = checked.array(state.get(f"{key}_off", streaks.off), (size,), f"{key}_off").astype(
                np.int64
            )
        return f
