"""The collector's fast ingest paths give, bit for bit, what the straightforward code gave.

Rewritten for speed (tests/bench/bench_ingest.py): `codec.decode` (one buffer, three vectorized
checks), `merge_step` (a cached plan, histograms added per rank), the thermometer (entropy sums
and engine types kept, cheaper slopes) and the phase detector (medians by a sort, and only for
the layers that read them). The references below are the code they replaced, kept verbatim
(the thermometer's and the detector's as subclasses overriding what changed). Random frames,
rank tables (replicas, shards, missing and inconsistent shards), samples (histograms on and
off, non-finite, negative and oversized values, bad lengths) and real monitored runs must
come out identical: the same errors with the same messages, the same arrays to the bit (NaN
payloads and signed zeros included), the same counts, changes and internal state.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
import warnings
from collections import deque

import numpy as np
import pytest
import scenarios

from thermoscope.collector.detect import (
    PHASES,
    REFRESH,
    TRANSITION,
    TYPE_I,
    TYPE_II,
    Change,
    PhaseDetector,
    Settings,
    _confidence,
    _last_rows,
    _mean,
    _median,
)
from thermoscope.collector.merge import MergePlans, merge_step
from thermoscope.science import physics
from thermoscope.science.derive import ENERGY_SLOPE_SIGMAS, Reading, Thermometer
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec
from thermoscope.wire.codec import F64, I64, LAYER_COLUMNS, MAX_COUNT, MAX_SEQ, SITE_COLUMNS, U32, WireError

# -- the references: the code the fast paths replaced -------------------------------------------


def reference_decode(
    frame: pb.Frame, n_layers: int, n_sites: int, bins: int, nonfinite: dict[str, int] | None = None
) -> Sample:
    lc = _reference_columns(frame.layers, LAYER_COLUMNS, n_layers, "layer")
    sc = _reference_columns(frame.sites, SITE_COLUMNS, n_sites, "site")
    hist = None
    if frame.layers.histogram:
        hist = _reference_columns(frame.layers, (("histogram", U32),), n_layers * (bins + 2), "layer")[
            "layer.histogram"
        ]
    if frame.seq > MAX_SEQ:
        raise WireError("invalid_value", f"frame seq {frame.seq} exceeds {MAX_SEQ}")
    counts = {} if nonfinite is None else nonfinite
    energy = frame.energy if frame.HasField("energy") else math.nan
    if math.isinf(energy):
        counts["energy"] = counts.get("energy", 0) + 1
        if energy < 0:
            energy = math.nan
    wall_time = frame.wall_time
    if not math.isfinite(wall_time):
        counts["wall_time"] = counts.get("wall_time", 0) + 1
        wall_time = time.time()
    for prefix, cols, probe in (("layer", lc, None), ("site", sc, "site.probe_spread")):
        floats = [name for name, values in cols.items() if values.dtype == F64 and name != probe]
        if probe is not None and not np.isfinite(cols[probe]).all():
            counts[prefix] = counts.get(prefix, 0) + int((~np.isfinite(cols[probe])).sum())
            cols[probe] = np.where(np.isfinite(cols[probe]), cols[probe], -1.0)
        if not floats:
            continue
        bad = ~np.isfinite(np.stack([cols[name] for name in floats]))
        if bad.any():
            counts[prefix] = counts.get(prefix, 0) + int(bad.sum())
            rows = bad.any(axis=0)
            for name in floats:
                cols[name] = np.where(rows, np.nan, cols[name])
    for name, values in (*lc.items(), *sc.items()):
        if name.endswith(("count", "m2")) and (values < 0).any():
            raise WireError("invalid_value", f"frame {frame.seq}: column {name} has negative values")
        if name.endswith("count") and (values > MAX_COUNT).any():
            raise WireError("invalid_value", f"frame {frame.seq}: column {name} exceeds {MAX_COUNT} values")
    return Sample(
        step=frame.step,
        wall_time=wall_time,
        energy=energy,
        layers=LayerStats(
            lc["layer.count"],
            lc["layer.mean"],
            lc["layer.m2"],
            lc["layer.grad_dot_before"],
            lc["layer.grad_dot_after"],
            None if hist is None else hist.astype(np.int64).reshape(n_layers, bins + 2),
        ),
        sites=SiteStats(*(sc[f"site.{name}"] for name, _ in SITE_COLUMNS)),
    )


def _reference_columns(msg, spec, n: int, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for field, dtype in spec:
        data = getattr(msg, field)
        if len(data) != n * dtype.itemsize:
            raise WireError(
                "length_mismatch",
                f"column {prefix}.{field} holds {len(data)} bytes; the hello declares {n} {prefix}s "
                f"({n * dtype.itemsize} bytes of {dtype.name})",
            )
        out[f"{prefix}.{field}"] = np.frombuffer(data, dtype=dtype)
    return out


def reference_merge_moments_grouped(group, count, mean, m2, size):
    group = np.asarray(group, dtype=np.int64)
    count = np.asarray(count, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    total = np.bincount(group, count, size)
    with np.errstate(divide="ignore", invalid="ignore"):
        merged_mean = np.where(total > 0, np.bincount(group, count * mean, size) / total, 0.0)
    spread = count * (mean - merged_mean[group]) ** 2
    return total, merged_mean, np.bincount(group, np.asarray(m2, dtype=np.float64) + spread, size)


def reference_merge_step(step, parts, tables, layer_names, site_names) -> Sample:
    layer_pos = {name: j for j, name in enumerate(layer_names)}
    site_pos = {name: j for j, name in enumerate(site_names)}
    ranks = sorted(parts)
    dest, shard, shards, stats = [], [], [], []
    for r in ranks:
        layers = tables[r][0]
        dest.append([layer_pos[layer.name] for layer in layers])
        shard.append([layer.shard_index for layer in layers])
        shards.append([layer.shard_count for layer in layers])
        stats.append(parts[r].layers)
    dest_a, shard_a, shards_a = (np.concatenate(x).astype(np.int64) for x in (dest, shard, shards))
    cat = {
        f: np.concatenate([getattr(s, f) for s in stats]).astype(np.float64)
        for f in ("count", "mean", "m2", "dot_before", "dot_after")
    }
    width = int(shards_a.max()) + 1
    _, first = np.unique(dest_a * width + shard_a, return_index=True)
    keep = np.zeros(len(dest_a), dtype=bool)
    keep[first] = True
    n_layers = len(layer_names)
    d = dest_a[keep]
    n, mean, m2 = reference_merge_moments_grouped(
        d, cat["count"][keep], cat["mean"][keep], cat["m2"][keep], n_layers
    )
    covered = np.bincount(d, minlength=n_layers)
    expected = np.zeros(n_layers, dtype=np.int64)
    expected[d] = shards_a[keep]
    missing = covered != expected
    nan_if_missing = np.where(missing, np.nan, 1.0)
    merged_hist = None
    if all(parts[r].layers.histogram is not None for r in ranks):
        hist = np.concatenate([parts[r].layers.histogram for r in ranks])[keep]
        merged_hist = np.zeros((n_layers, hist.shape[1]), dtype=np.int64)
        np.add.at(merged_hist, d, hist)
    layers = LayerStats(
        count=n.astype(np.int64),
        mean=mean * nan_if_missing,
        m2=m2 * nan_if_missing,
        dot_before=np.bincount(d, cat["dot_before"][keep], n_layers) * nan_if_missing,
        dot_after=np.bincount(d, cat["dot_after"][keep], n_layers) * nan_if_missing,
        histogram=merged_hist,
    )
    site_dest = np.asarray([site_pos[s.name] for r in ranks for s in tables[r][1]], dtype=np.int64)
    scat = {
        f: np.concatenate([getattr(parts[r].sites, f) for r in ranks]).astype(np.float64)
        for f in ("count", "in_mean", "in_m2", "out_mean", "out_m2")
    }
    n_sites = len(site_names)
    sn, in_mean, in_m2 = reference_merge_moments_grouped(
        site_dest, scat["count"], scat["in_mean"], scat["in_m2"], n_sites
    )
    probe = np.full(n_sites, -1.0)
    np.maximum.at(probe, site_dest, np.concatenate([parts[r].sites.probe_spread for r in ranks]))
    _, out_mean, out_m2 = reference_merge_moments_grouped(
        site_dest, scat["count"], scat["out_mean"], scat["out_m2"], n_sites
    )
    energies = [parts[r].energy for r in ranks if parts[r].has_energy]
    return Sample(
        step=step,
        wall_time=max(parts[r].wall_time for r in ranks),
        energy=float(np.mean(energies)) if energies else math.nan,
        layers=layers,
        sites=SiteStats(sn.astype(np.int64), in_mean, in_m2, out_mean, out_m2, probe),
    )


# -- comparison -----------------------------------------------------------------------------------


def assert_same_array(a, b, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is None:
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
    assert a.tobytes() == b.tobytes(), f"{what}: {a} != {b}"


def assert_same_sample(a: Sample, b: Sample, *, wall_time: bool = True) -> None:
    assert a.step == b.step
    assert np.float64(a.energy).tobytes() == np.float64(b.energy).tobytes(), (a.energy, b.energy)
    if wall_time:
        assert a.wall_time == b.wall_time
    for f in ("count", "mean", "m2", "dot_before", "dot_after", "histogram"):
        assert_same_array(getattr(a.layers, f), getattr(b.layers, f), f"layers.{f}")
    for f in ("count", "in_mean", "in_m2", "out_mean", "out_m2", "probe_spread"):
        assert_same_array(getattr(a.sites, f), getattr(b.sites, f), f"sites.{f}")


# -- decode ----------------------------------------------------------------------------------------

SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, -1.0]


def random_frame(rng: np.random.Generator) -> tuple[pb.Frame, int, int, int]:
    """A frame for (n_layers, n_sites, bins), mostly valid, often with one thing wrong or odd."""
    nl, ns, bins = int(rng.integers(1, 12)), int(rng.integers(0, 4)), int(rng.integers(1, 6))
    odd = rng.random() < 0.7

    def floats(n: int) -> np.ndarray:
        v = rng.normal(0, 3, n)
        if odd and n and rng.random() < 0.5:
            v[rng.integers(0, n, int(rng.integers(1, 3)))] = rng.choice(SPECIAL)
        return v

    def counts(n: int) -> np.ndarray:
        c = rng.integers(0, 1000, n)
        if odd and n and rng.random() < 0.15:
            c[rng.integers(0, n)] = rng.choice([-1, -(2**63), MAX_COUNT, MAX_COUNT + 1, 2**63 - 1])
        return c

    def m2(n: int) -> np.ndarray:
        v = np.abs(floats(n))
        if odd and n and rng.random() < 0.2:
            v[rng.integers(0, n)] = rng.choice([-1e-300, -5.0, -0.0, -math.inf])
        return v

    layer = {
        "count": counts(nl),
        "mean": floats(nl),
        "m2": m2(nl),
        "grad_dot_before": floats(nl),
        "grad_dot_after": floats(nl),
    }
    site = {
        "count": counts(ns),
        "in_mean": floats(ns),
        "in_m2": m2(ns),
        "out_mean": floats(ns),
        "out_m2": m2(ns),
        "probe_spread": floats(ns),
    }
    data = {("layer", k): codec._bytes(v, I64 if k == "count" else F64) for k, v in layer.items()}
    data |= {("site", k): codec._bytes(v, I64 if k == "count" else F64) for k, v in site.items()}
    hist = b""
    if rng.random() < 0.6:
        hist = codec._bytes(rng.integers(0, 2**32, (nl, bins + 2)), U32)
    if odd and rng.random() < 0.15:  # a column of the wrong length
        key = list(data)[int(rng.integers(0, len(data)))]
        data[key] = data[key][: -8 or None] if data[key] and rng.random() < 0.5 else data[key] + bytes(8)
    if odd and hist and rng.random() < 0.1:
        hist = hist[:-4]
    frame = pb.Frame(
        seq=int(rng.choice([1, 7, MAX_SEQ, MAX_SEQ + 1])) if odd else 3,
        step=int(rng.integers(0, 100)),
        wall_time=float(rng.choice([1.5e9, math.nan, math.inf])) if odd and rng.random() < 0.2 else 1.5e9,
        layers=pb.LayerColumns(**{k: data[("layer", k)] for k in layer}, histogram=hist),
        sites=pb.SiteColumns(**{k: data[("site", k)] for k in site}),
    )
    if rng.random() < 0.8:
        frame.energy = float(rng.choice([0.5, math.inf, -math.inf, math.nan])) if odd else 0.5
    return pb.Frame.FromString(frame.SerializeToString()), nl, ns, bins


def outcome(decode, frame: pb.Frame, nl: int, ns: int, bins: int):
    counts: dict[str, int] = {}
    try:
        return decode(frame, nl, ns, bins, counts), counts
    except WireError as exc:
        return (exc.reason, str(exc)), counts


def test_decode_is_the_column_by_column_decode_on_random_frames() -> None:
    rng = np.random.default_rng(20261201)
    kinds = set()
    for _ in range(3000):
        frame, nl, ns, bins = random_frame(rng)
        new, new_counts = outcome(codec.decode, frame, nl, ns, bins)
        old, old_counts = outcome(reference_decode, frame, nl, ns, bins)
        assert new_counts == old_counts
        if isinstance(old, tuple):
            assert new == old
            kinds.add(next((w for w in ("negative", "seq", "values") if w in old[1].split()), old[0]))
        else:
            assert isinstance(new, Sample)
            # a non-finite wall time reads as the time of decoding: only the finite ones compare
            assert_same_sample(new, old, wall_time=math.isfinite(frame.wall_time))
            kinds.add("ok" if not old_counts else "nonfinite")
    # the cases reached every outcome: accepted, non-finite, each refusal
    assert kinds == {"ok", "nonfinite", "length_mismatch", "negative", "values", "seq"}, kinds


# -- merge -----------------------------------------------------------------------------------------


def random_tables(rng: np.random.Generator, world: int) -> dict[int, tuple[list[LayerInfo], list[SiteInfo]]]:
    """Rank tables over a pool of layers, each held whole by some ranks (replicas) or split into
    shards spread over them; some shards missing, some shard counts inconsistent between ranks.
    A third of them regular: every rank holds every layer, in order, whole or its own shard."""
    sites = [SiteInfo("s0", "ReLU")]
    if rng.random() < 0.35:
        sharded = rng.random() < 0.5
        shard = [(r, world) if sharded and world > 1 else (0, 1) for r in range(world)]
        return {
            r: ([LayerInfo(f"l{j}", (4,), 4, "float32", *shard[r]) for j in range(5)], sites)
            for r in range(world)
        }
    tables: dict[int, tuple[list[LayerInfo], list[SiteInfo]]] = {r: ([], []) for r in range(world)}
    for j in range(int(rng.integers(1, 10))):
        kind = rng.choice(["replica", "shard", "shard"])
        if kind == "replica":
            holders = rng.choice(world, int(rng.integers(1, world + 1)), replace=False)
            for r in holders:
                tables[int(r)][0].append(LayerInfo(f"l{j}", (4,), 4, "float32"))
        else:
            count = int(rng.integers(2, 5))
            for index in range(count):
                if rng.random() < 0.1:
                    continue  # a missing shard
                for r in rng.choice(world, int(rng.integers(1, min(world, 2) + 1)), replace=False):
                    declared = count + 1 if rng.random() < 0.05 else count  # a rank that disagrees
                    if not any(x.name == f"l{j}" for x in tables[int(r)][0]):
                        tables[int(r)][0].append(LayerInfo(f"l{j}", (4,), 4, "float32", index, declared))
    for r in range(world):
        for k in range(int(rng.integers(0, 3))):
            tables[r][1].append(SiteInfo(f"s{(k + r) % 3}", "ReLU"))
        order = rng.permutation(len(tables[r][0]))
        tables[r] = ([tables[r][0][i] for i in order], tables[r][1])
        if not tables[r][0]:
            tables[r][0].append(LayerInfo("l_only", (4,), 4, "float32"))
    return tables


def random_part(rng: np.random.Generator, step: int, table, hist: bool, bins: int) -> Sample:
    nl, ns = len(table[0]), len(table[1])

    def floats(n: int) -> np.ndarray:
        v = rng.normal(0, 2, n)
        if n and rng.random() < 0.2:
            v[rng.integers(0, n)] = rng.choice([math.nan, -0.0, 0.0, 1e300])
        return v

    return Sample(
        step=step,
        wall_time=float(rng.random()),
        energy=float(rng.choice([rng.random(), math.nan])),
        layers=LayerStats(
            rng.integers(0, 50, nl) * (rng.random(nl) < 0.9),
            floats(nl),
            np.abs(floats(nl)),
            floats(nl),
            floats(nl),
            rng.integers(0, 100, (nl, bins + 2)) if hist else None,
        ),
        sites=SiteStats(
            rng.integers(0, 50, ns),
            floats(ns),
            np.abs(floats(ns)),
            floats(ns),
            np.abs(floats(ns)),
            rng.choice([-1.0, 0.0, -0.0, 1e-9, 0.5, math.nan], ns),
        ),
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the extreme values overflow, in both alike
@pytest.mark.parametrize("seed", range(6))
def test_merge_step_with_cached_plans_is_the_from_scratch_merge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    plans = MergePlans()
    bins = int(rng.integers(1, 6))
    for _epoch in range(8):  # tables change (ranks say hello again) between epochs
        world = int(rng.integers(1, 6))
        tables = random_tables(rng, world)
        layer_names = list(dict.fromkeys(x.name for r in sorted(tables) for x in tables[r][0]))
        site_names = list(dict.fromkeys(x.name for r in sorted(tables) for x in tables[r][1]))
        if rng.random() < 0.3:  # a layer of a rank that did not send this step
            layer_names.append("l_absent")
        for step in range(6):
            ranks = sorted(rng.choice(world, int(rng.integers(1, world + 1)), replace=False).tolist())
            hist = rng.random() < 0.6
            parts = {r: random_part(rng, step, tables[r], hist and (rng.random() < 0.9), bins) for r in ranks}
            old = reference_merge_step(step, parts, tables, layer_names, site_names)
            assert_same_sample(merge_step(step, parts, tables, layer_names, site_names, plans), old)
            assert_same_sample(merge_step(step, parts, tables, list(layer_names), site_names), old)


# -- thermometer -------------------------------------------------------------------------------


def reference_slope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if n < 2 or sxx == 0.0:
        nan = np.full(y.shape[1:], np.nan)
        return nan, nan
    yc = y - y.mean(axis=0)
    b = np.tensordot(xc, yc, axes=(0, 0)) / sxx
    if n < 3:
        return b, np.zeros_like(b)
    resid = yc - np.multiply.outer(xc, b)
    se = np.sqrt((resid * resid).sum(axis=0) / (n - 2) / sxx)
    return b, se


class ReferenceThermometer(Thermometer):
    """The thermometer as it was: every value recomputed at every sample."""

    def update(self, sample: Sample) -> Reading:
        prev = self._last
        if prev is not None and sample.step <= prev.step:
            raise ValueError(f"sample for step {sample.step} after step {prev.step}")
        layers = sample.layers
        entropy = physics.layer_entropy(layers.count, layers.mean, layers.m2)
        if prev is None:
            cumulative = np.zeros(len(layers))
        else:
            cumulative = self._work[-1] + prev.layers.work * (sample.step - prev.step)
        energy = sample.energy if sample.has_energy else float(cumulative.sum())
        self._steps.append(sample.step)
        self._energy.append(energy)
        self._entropy.append(entropy)
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
        site_engine = physics.engine_type(self._probe)
        if layers.histogram is not None:
            h_hist = physics.histogram_entropy(layers.histogram, self._lo, self._hi)
            h_gauss = physics.gaussian_entropy(physics.variance(layers.count, layers.mean, layers.m2))
            self._shape = (h_hist, h_gauss - h_hist, physics.outside_fraction(layers.histogram))
        h_hist, negentropy, outside = self._shape
        self.latest = Reading(
            step=sample.step,
            wall_time=sample.wall_time,
            energy=energy,
            entropy=float(entropy.sum()),
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
            engine=physics.network_engine_type(site_engine),
            energy_from_work=not sample.has_energy,
        )
        return self.latest

    def _job_temperature(self) -> tuple[float, float]:
        steps = np.asarray(self._steps, dtype=np.float64)
        energy = np.asarray(self._energy, dtype=np.float64)
        known = np.isfinite(energy)
        if known.sum() < 3:
            return math.nan, math.nan
        total_s = np.asarray([s.sum() for s in self._entropy])[known]
        ds, _ = reference_slope(steps[known], total_s)
        de, de_err = reference_slope(steps[known], energy[known])
        count = float(self._last.layers.count.sum()) if self._last is not None else 0.0
        span = float(steps[known][-1] - steps[known][0])
        beta, temp = physics.temperature(
            ds * span,
            de * span,
            entropy_floor=physics.ENTROPY_RESOLUTION * count,
            energy_floor=ENERGY_SLOPE_SIGMAS * de_err * span,
        )
        return float(beta), float(temp)


def assert_same_reading(a: Reading, b: Reading) -> None:
    for f in dataclasses.fields(Reading):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert_same_array(x, y, f.name)
        elif isinstance(x, float):
            assert np.float64(x).tobytes() == np.float64(y).tobytes(), (f.name, x, y)
        else:
            assert x == y, (f.name, x, y)


def test_slope_is_the_tensordot_slope() -> None:
    rng = np.random.default_rng(3)
    for n in range(0, 25):
        for shape in ((n,), (n, 3)):
            x = np.cumsum(rng.integers(1, 4, n)).astype(float)
            y = rng.normal(0, 10.0 ** rng.integers(-3, 4), shape)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # n = 0: the mean of nothing
                for new, old in zip(physics.slope(x, y), reference_slope(x, y), strict=True):
                    assert_same_array(new, old, f"slope n={n} {shape}")


@pytest.mark.parametrize("seed", range(4))
def test_thermometer_is_the_recomputing_thermometer(seed: int) -> None:
    """Random merged samples (energies missing at times, histograms every few steps, probes now
    and then, NaN layers); midway the thermometer is pickled as an older collector saved it
    (without the caches) and carries on from the copy."""
    rng = np.random.default_rng(seed)
    nl, ns, bins = 7, 3, 5
    layers = [LayerInfo(f"l{j}", (9,), 9, "float32", hist_lo=-1.0 - j, hist_hi=1.0 + j) for j in range(nl)]
    sites = [SiteInfo(f"s{k}", "ReLU") for k in range(ns)]
    table = (layers, sites)
    new, old = Thermometer(layers, sites, window=6), ReferenceThermometer(layers, sites, window=6)
    step = 0
    for i in range(80):
        step += int(rng.integers(1, 4))
        part = random_part(rng, step, table, hist=rng.random() < 0.3, bins=bins)
        sample = dataclasses.replace(
            part, energy=float(rng.choice([1.0 / (i + 1), math.nan, 2.0 + rng.random()]))
        )
        if rng.random() < 0.2:  # a probe moved on some sites
            probe = np.where(rng.random(ns) < 0.5, rng.choice([0.0, 1e-9, 0.3], ns), -1.0)
            sample = dataclasses.replace(sample, sites=dataclasses.replace(sample.sites, probe_spread=probe))
        with np.errstate(all="ignore"):
            assert_same_reading(new.update(sample), old.update(sample))
        if i == 40:
            state = {k: v for k, v in new.__dict__.items() if k not in ("_total", "_engines")}
            saved = Thermometer.__new__(Thermometer)
            saved.__dict__.update(state)
            new = pickle.loads(pickle.dumps(saved))


# -- detector --------------------------------------------------------------------------------------


class ReferenceDetector(PhaseDetector):
    """The layers' update as it was: both medians over every layer at every sample."""

    def _update_layers(self, step: int, h: np.ndarray) -> list[Change]:
        s = self.s
        if self._last is None:
            self._last = np.where(np.isfinite(h), h, np.nan)
            self._initial = self._last.copy()
            return []
        known = np.isfinite(h)
        first = known & np.isnan(self._last)
        self._initial = np.where(first, h, self._initial)
        d = np.where(known & ~first, h - self._last, 0.0)
        self._last = np.where(known, h, self._last)
        self._ring[self._count % s.window] = d
        self._count += 1
        n = min(self._count, s.window)
        ring = self._ring[:n]
        speed = np.abs(ring)
        net = ring.sum(axis=0)
        path = speed.sum(axis=0)
        er = np.divide(np.abs(net), path, out=np.zeros_like(path), where=path > 0)
        rate = np.abs(net) / n
        recent = np.median(speed[_last_rows(self._count, s.window, 3)], axis=0)
        moved = np.abs(np.nan_to_num(self._last - self._initial)) > s.tol

        state = self.layers
        if self._count < s.min_fit:
            return []
        self._hi = np.where(er >= s.er_hi, self._hi + 1, 0)
        learning = (state != TYPE_II) & (er >= s.er_hi)
        self._peak = np.where(learning, np.maximum(self._peak, rate), self._peak)
        quiet = (er < s.er_lo) | (rate <= s.quiet_rate * self._peak)
        self._lo = np.where(quiet, self._lo + 1, 0)
        typical = np.median(speed, axis=0)
        calm = state == TYPE_II
        self._baseline = np.where(
            calm,
            np.where(
                np.isnan(self._baseline),
                typical,
                (1 - s.baseline_alpha) * self._baseline + s.baseline_alpha * typical,
            ),
            self._baseline,
        )
        ready = self._layer_cool == 0
        new = state.copy()
        new[(state == TYPE_I) & moved & (self._hi >= s.confirm)] = TRANSITION
        new[(state == TYPE_I) & moved & (self._lo >= s.settle)] = TYPE_II
        new[(state == TRANSITION) & ready & (self._lo >= s.settle)] = TYPE_II
        if self._since_jump <= s.window:
            new[calm & ready & (recent > s.burst * self._baseline) & (self._baseline > 0)] = REFRESH
        waking = (self._hi >= s.settle) & ((self._peak == 0) | (rate > s.wake_rate * self._peak))
        new[calm & ready & waking] = TRANSITION
        new[(state == REFRESH) & ready & (self._hi >= s.confirm)] = TRANSITION
        new[(state == REFRESH) & ready & (self._lo >= s.settle)] = TYPE_II
        changed = np.flatnonzero(new != state)
        if len(changed) == 0:
            self._layer_cool = np.maximum(self._layer_cool - 1, 0)
            return []
        self._peak[changed[new[changed] == REFRESH]] = 0.0
        self._hi[changed] = self._lo[changed] = 0
        self._layer_cool = np.maximum(self._layer_cool - 1, 0)
        self._layer_cool[changed] = s.cooldown
        changes = []
        for j in changed:
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


def assert_same_state(a, b) -> None:
    assert a.__dict__.keys() == b.__dict__.keys()
    for k, x in a.__dict__.items():
        y = b.__dict__[k]
        if isinstance(x, (np.ndarray, deque)):
            assert_same_array(np.asarray(x), np.asarray(y), k)
        else:
            assert x == y or (x != x and y != y), (k, x, y)


def test_median_and_mean_are_numpys() -> None:
    rng = np.random.default_rng(5)
    for n in range(1, 24):
        a = np.abs(rng.standard_t(2, (n, 9)))
        a[rng.random((n, 9)) < 0.05] = rng.choice([np.nan, np.inf, 0.0])
        assert_same_array(_median(a), np.median(a, axis=0), f"median of {n}")
        x = rng.normal(0, 10.0 ** rng.integers(-3, 4), n)
        assert _mean(x).tobytes() == x.mean().tobytes() and type(_mean(x)) is type(x.mean())


@pytest.mark.parametrize(
    ("kind", "seed", "settings", "reach"),
    [
        ("shift", 0, None, {"type_ii", "refresh"}),
        ("shift", 2, None, {"type_ii", "refresh"}),
        ("shift", 1, Settings(window=7, min_fit=3, settle=4, confirm=2, cooldown=2), {"type_ii"}),
        ("frozen", 1, Settings(window=9), {"type_ii"}),
        ("divergence", 3, None, {"type_ii"}),
    ],
)
def test_detector_is_the_one_with_full_medians(
    kind: str, seed: int, settings: Settings | None, reach: set[str]
) -> None:
    """Real monitored runs (tests/scenarios.py), with non-finite entropies and energies strewn in:
    the same changes and the same state after every sample; the runs take layers to `reach`
    (type_ii: the baseline's median; refresh: the median of the last three speeds)."""
    trace = scenarios.generate(kind, seed)
    rng = np.random.default_rng(seed)
    entropy = trace.entropy.copy()
    entropy[rng.random(entropy.shape) < 0.01] = np.nan
    entropy[rng.random(entropy.shape) < 0.002] = np.inf
    energy = np.where(rng.random(len(trace.energy)) < 0.02, np.nan, trace.energy)
    new = PhaseDetector(entropy.shape[1], settings)
    old = ReferenceDetector(entropy.shape[1], settings)
    reached = set()
    for step, e, h in zip(trace.steps, energy, entropy, strict=True):
        with np.errstate(all="ignore"):
            changes = new.update(int(step), float(e), h)
            assert changes == old.update(int(step), float(e), h)
        assert_same_state(new, old)
        reached |= {c.after for c in changes if c.series >= 0}
    assert reach <= reached, reached
