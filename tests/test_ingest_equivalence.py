"""The collector's fast ingest paths give, bit for bit, what the straightforward code gave.

`wire.decode` (one buffer, checks settled by three vectorized tests) was rewritten for
speed (tests/bench/bench_ingest.py). The reference implementation below is the code it
replaced, kept verbatim; random frames (non-finite, negative and oversized values, bad
lengths, histograms on and off) must come out identical: the same errors with the same
messages, the same arrays to the bit (NaN payloads and signed zeros included), the same
counts of non-finite values.
"""

from __future__ import annotations

import math
import time

import numpy as np

from thermoscope.agent import wire
from thermoscope.agent.stats import LayerStats, Sample, SiteStats
from thermoscope.agent.wire import F64, I64, LAYER_COLUMNS, MAX_COUNT, MAX_SEQ, SITE_COLUMNS, U32, WireError
from thermoscope.v1 import telemetry_pb2 as pb

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
    data = {("layer", k): wire._bytes(v, I64 if k == "count" else F64) for k, v in layer.items()}
    data |= {("site", k): wire._bytes(v, I64 if k == "count" else F64) for k, v in site.items()}
    hist = b""
    if rng.random() < 0.6:
        hist = wire._bytes(rng.integers(0, 2**32, (nl, bins + 2)), U32)
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
        new, new_counts = outcome(wire.decode, frame, nl, ns, bins)
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
