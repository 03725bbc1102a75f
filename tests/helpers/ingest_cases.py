"""The seeded inputs of the collector's ingest golden tests (tests/test_ingest_equivalence.py).

Random frames, rank tables (replicas, shards, missing and inconsistent shards), merged samples
(histograms on and off, non-finite, negative and oversized values, bad lengths), the
thermometer's runs and the slope's series: each a pure function of its seed, so that the test
and tests/golden/record.py build the same inputs. Every case also has an `inputs_fingerprint`:
the golden files record it, and a test whose inputs no longer match (numpy changed a random
stream) says so instead of reporting a difference of outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from thermoscope.science.detect import Settings
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.codec import F64, I64, MAX_COUNT, MAX_SEQ, U32, WireError

from helpers.golden import fingerprint

DECODE_SEED = 20261201
DECODE_FRAMES = 3000
MERGE_SEEDS = range(6)
MERGE_EPOCHS = 8  # tables change (ranks say hello again) between epochs
MERGE_STEPS = 6
THERMOMETER_SEEDS = range(4)
THERMOMETER_SAMPLES = 80
THERMOMETER_WINDOW = 6
SLOPE_SEED = 3
SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, -1.0]


def column(values: np.ndarray, dtype: np.dtype) -> bytes:
    """A column as an agent puts it on the wire: the values in `dtype`, contiguous."""
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


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
    data = {("layer", k): column(v, I64 if k == "count" else F64) for k, v in layer.items()}
    data |= {("site", k): column(v, I64 if k == "count" else F64) for k, v in site.items()}
    hist = b""
    if rng.random() < 0.6:
        hist = column(rng.integers(0, 2**32, (nl, bins + 2)), U32)
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


def decode_cases() -> list[tuple[pb.Frame, int, int, int]]:
    """The frames of the decode golden, with the (n_layers, n_sites, bins) their hello declared."""
    rng = np.random.default_rng(DECODE_SEED)
    return [random_frame(rng) for _ in range(DECODE_FRAMES)]


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
    """One rank's sample for its `table`: some NaN, signed-zero and huge values, empty layers."""
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


@dataclasses.dataclass(frozen=True)
class MergeCase:
    """The arguments of one flat step's merge (`JobMerge.merge`)."""

    step: int
    parts: dict[int, Sample]
    tables: dict[int, tuple[list[LayerInfo], list[SiteInfo]]]
    layer_names: list[str]
    site_names: list[str]


def merge_cases(seed: int) -> Iterator[MergeCase]:
    """A job's steps over MERGE_EPOCHS rank tables: some ranks silent at each step, and at times
    a layer of a rank that did not send."""
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(1, 6))
    for _epoch in range(MERGE_EPOCHS):
        world = int(rng.integers(1, 6))
        tables = random_tables(rng, world)
        layer_names = list(dict.fromkeys(x.name for r in sorted(tables) for x in tables[r][0]))
        site_names = list(dict.fromkeys(x.name for r in sorted(tables) for x in tables[r][1]))
        if rng.random() < 0.3:
            layer_names.append("l_absent")
        for step in range(MERGE_STEPS):
            ranks = sorted(rng.choice(world, int(rng.integers(1, world + 1)), replace=False).tolist())
            hist = rng.random() < 0.6
            parts = {r: random_part(rng, step, tables[r], hist and (rng.random() < 0.9), bins) for r in ranks}
            yield MergeCase(step, parts, tables, layer_names, site_names)


@dataclasses.dataclass(frozen=True)
class ThermometerRun:
    """A job's merged samples (energies missing at times, histograms every few steps, probes now
    and then, NaN layers) and the tables its thermometer is made for."""

    layers: list[LayerInfo]
    sites: list[SiteInfo]
    samples: list[Sample]


def thermometer_run(seed: int) -> ThermometerRun:
    rng = np.random.default_rng(seed)
    nl, ns, bins = 7, 3, 5
    layers = [LayerInfo(f"l{j}", (9,), 9, "float32", hist_lo=-1.0 - j, hist_hi=1.0 + j) for j in range(nl)]
    sites = [SiteInfo(f"s{k}", "ReLU") for k in range(ns)]
    samples = []
    step = 0
    for i in range(THERMOMETER_SAMPLES):
        step += int(rng.integers(1, 4))
        part = random_part(rng, step, (layers, sites), hist=rng.random() < 0.3, bins=bins)
        sample = dataclasses.replace(
            part, energy=float(rng.choice([1.0 / (i + 1), math.nan, 2.0 + rng.random()]))
        )
        if rng.random() < 0.2:  # a probe moved on some sites
            probe = np.where(rng.random(ns) < 0.5, rng.choice([0.0, 1e-9, 0.3], ns), -1.0)
            sample = dataclasses.replace(sample, sites=dataclasses.replace(sample.sites, probe_spread=probe))
        samples.append(sample)
    return ThermometerRun(layers, sites, samples)


def slope_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """(x, y) series of 0 to 24 points, y one series or three, of scales 1e-3 to 1e3."""
    rng = np.random.default_rng(SLOPE_SEED)
    cases = []
    for n in range(0, 25):
        for shape in ((n,), (n, 3)):
            x = np.cumsum(rng.integers(1, 4, n)).astype(float)
            y = rng.normal(0, 10.0 ** rng.integers(-3, 4), shape)
            cases.append((x, y))
    return cases


def decode_outcome(decode, frame: pb.Frame, nl: int, ns: int, bins: int) -> tuple[str, str, dict, bytes]:
    """(refusal reason, message, non-finite counts, fingerprint of the decoded sample) of one frame:
    reason and message empty when accepted, fingerprint empty when refused. A non-finite wall time
    reads as the time of decoding, so the sample's wall time counts only where the frame's is finite.
    """
    counts: dict[str, int] = {}
    try:
        sample = decode(frame, nl, ns, bins, counts)
    except WireError as exc:
        return exc.reason, str(exc), counts, b""
    if not math.isfinite(frame.wall_time):
        sample = dataclasses.replace(sample, wall_time=None)
    return "", "", counts, fingerprint(sample)


#: (kind, seed, settings) of the detector's golden runs: real monitored trainings (helpers.scenarios)
DETECTOR_RUNS = (
    ("shift", 0, None),
    ("shift", 2, None),
    ("shift", 1, Settings(window=7, min_fit=3, settle=4, confirm=2, cooldown=2)),
    ("frozen", 1, Settings(window=9)),
    ("divergence", 3, None),
)
