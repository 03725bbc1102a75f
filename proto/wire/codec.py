"""Between `Sample`s and the wire contract (proto/thermoscope/v1/telemetry.proto).

Columns travel as little-endian bytes (measured here: ~4 us per 10k values against ~3 ms
for a `repeated double` filled from numpy). Decoding validates everything a bad or buggy
agent could send and raises `WireError` with a reason (a bounded label for the rejection
counter) and a message for the agent.
"""

from __future__ import annotations

import functools
import math
import time
from itertools import accumulate, pairwise

import numpy as np

from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats
from thermoscope.v1 import telemetry_pb2 as pb

#: The wire's version, which an agent says in its hello and a collector in its config. It changes
#: only with a change that an older reader would misread; fields added within a version are
#: optional to both sides (proto3 skips what it does not know). A collector accepts
#: `OLDEST_PROTOCOL_VERSION` (the previous release's: N-1) up to its own, so one upgraded in the
#: middle of a job keeps its older agents (docs/security.md, "Version skew").
PROTOCOL_VERSION = 1
OLDEST_PROTOCOL_VERSION = 1
F64 = np.dtype("<f8")
I64 = np.dtype("<i8")
U32 = np.dtype("<u4")

LAYER_COLUMNS = (
    ("count", I64),
    ("mean", F64),
    ("m2", F64),
    ("grad_dot_before", F64),
    ("grad_dot_after", F64),
)
SITE_COLUMNS = (
    ("count", I64),
    ("in_mean", F64),
    ("in_m2", F64),
    ("out_mean", F64),
    ("out_m2", F64),
    ("probe_spread", F64),
)
#: Largest number of histogram bins a hello may declare.
MAX_BINS = 4096
#: Most values one rank may summarize per layer or site (2**40: a 4 TB float32 shard): counts
#: stay exact in float64 and their sums over ranks far from int64 overflow.
MAX_COUNT = 1 << 40
#: Largest frame sequence number (a uint64 on the wire): what a signed 64-bit column holds.
MAX_SEQ = (1 << 63) - 1
#: A frame's wall time is plausible from 2000-01-01T00:00:00Z (before any run this could watch;
#: a clock reset to 1970 or to 0 falls below it) up to `WALL_TIME_AHEAD` seconds past the
#: collector's clock (a day: clocks a time zone off still pass; milliseconds sent as seconds
#: do not). Any other wall time reads as the time of decoding (see `decode`).
EARLIEST_WALL_TIME = 946684800.0
WALL_TIME_AHEAD = 86400.0


class WireError(ValueError):
    """A message that breaks the contract. `reason` is a short, bounded label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def hello(
    *,
    job_id: str,
    run_id: str,
    rank: int,
    world_size: int,
    host: str,
    agent_version: str,
    local_rank: int = 0,
    node: str = "",
    pod: str = "",
    gpu: str = "",
    every: int,
    layers: list[LayerInfo],
    sites: list[SiteInfo],
    bins: int,
) -> pb.AgentMessage:
    return pb.AgentMessage(
        hello=pb.Hello(
            job_id=job_id,
            run_id=run_id,
            rank=rank,
            world_size=world_size,
            host=host,
            agent_version=agent_version,
            local_rank=local_rank,
            node=node,
            pod=pod,
            gpu=gpu,
            protocol_version=PROTOCOL_VERSION,
            every=every,
            layers=[
                pb.Layer(
                    name=layer.name,
                    shape=layer.shape,
                    numel=layer.numel,
                    dtype=layer.dtype,
                    shard=pb.Shard(index=layer.shard_index, count=layer.shard_count)
                    if layer.shard_count > 1
                    else None,
                    histogram_lo=layer.hist_lo,
                    histogram_hi=layer.hist_hi,
                )
                for layer in layers
            ],
            sites=[pb.Site(name=site.name, kind=site.kind, function=site.function) for site in sites],
            histogram_bins=bins,
        )
    )


def encode(sample: Sample, seq: int) -> pb.AgentMessage:
    layers, sites = sample.layers, sample.sites
    frame = pb.Frame(
        seq=seq,
        step=sample.step,
        wall_time=sample.wall_time,
        layers=pb.LayerColumns(
            count=_bytes(layers.count, I64),
            mean=_bytes(layers.mean, F64),
            m2=_bytes(layers.m2, F64),
            grad_dot_before=_bytes(layers.dot_before, F64),
            grad_dot_after=_bytes(layers.dot_after, F64),
            histogram=b"" if layers.histogram is None else _bytes(layers.histogram, U32),
            update_sq=b"" if np.isnan(layers.update_sq).all() else _bytes(layers.update_sq, F64),
        ),
        sites=pb.SiteColumns(
            count=_bytes(sites.count, I64),
            in_mean=_bytes(sites.in_mean, F64),
            in_m2=_bytes(sites.in_m2, F64),
            out_mean=_bytes(sites.out_mean, F64),
            out_m2=_bytes(sites.out_m2, F64),
            probe_spread=_bytes(sites.probe_spread, F64),
        ),
    )
    if sample.has_energy:
        frame.energy = sample.energy
    return pb.AgentMessage(frame=frame)


def grow_sites(data: bytes, n_sites: int) -> bytes:
    """A serialized frame of a smaller site table, read against one grown to `n_sites` (a site
    table only grows: the sites that joined after it made no value on its step)."""
    msg = pb.AgentMessage.FromString(data)
    sites = msg.frame.sites
    extra = n_sites - len(sites.count) // I64.itemsize
    if extra <= 0:
        return data
    zeros = bytes(8 * extra)
    sites.count += zeros
    sites.in_mean += zeros
    sites.in_m2 += zeros
    sites.out_mean += zeros
    sites.out_m2 += zeros
    sites.probe_spread += _bytes(np.full(extra, -1.0), F64)
    return msg.SerializeToString()


def _bytes(values: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def decode_hello(msg: pb.Hello) -> tuple[list[LayerInfo], list[SiteInfo]]:
    """Validate a Hello and return its layer and site tables."""
    if not OLDEST_PROTOCOL_VERSION <= msg.protocol_version <= PROTOCOL_VERSION:
        raise WireError(
            "protocol_version",
            f"protocol version {msg.protocol_version} is not supported (this collector speaks"
            f" {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}): an agent newer than its collector"
            " waits for the collector's upgrade",
        )
    if not msg.job_id:
        raise WireError("hello", "hello has no job_id")
    if msg.world_size < 1 or msg.rank >= msg.world_size:
        raise WireError("hello", f"rank {msg.rank} is outside world size {msg.world_size}")
    if not msg.layers:
        raise WireError("hello", "hello declares no layers")
    if not 1 <= msg.histogram_bins <= MAX_BINS:
        raise WireError("hello", f"histogram_bins must be 1..{MAX_BINS}, got {msg.histogram_bins}")
    layers = []
    for layer in msg.layers:  # each field read once: upb's attribute access is most of the cost
        name, numel, lo, hi = layer.name, layer.numel, layer.histogram_lo, layer.histogram_hi
        if layer.HasField("shard"):
            shard = layer.shard
            index, count = shard.index, shard.count
        else:
            index, count = 0, 1
        if not name or numel < 0 or count < 1 or index >= count:
            raise WireError("hello", f"layer {name!r}: bad name, numel or shard ({index} of {count})")
        if not (lo < hi and math.isfinite(lo) and math.isfinite(hi)):
            raise WireError("hello", f"layer {name!r}: histogram edges [{lo}, {hi}) are not an interval")
        layers.append(LayerInfo(name, tuple(layer.shape), numel, layer.dtype, index, count, lo, hi))
    if len({layer.name for layer in layers}) != len(layers):
        raise WireError("hello", "hello names a layer twice")
    return layers, [SiteInfo(site.name, site.kind, site.function) for site in msg.sites]


def decode(
    frame: pb.Frame, n_layers: int, n_sites: int, bins: int, nonfinite: dict[str, int] | None = None
) -> Sample:
    """Validate a Frame against the stream's Hello and return its Sample.

    NaN and Inf are not refused (a diverging run legitimately produces them, and refusing its
    stream would lose the rest): a layer or site with a non-finite value in any of its float
    columns is NaN in all of them (so no merge sums it; the merged layer is NaN at that step),
    a probe that is not finite reads "not probed", and an energy of -inf reads "no loss" (+inf
    is a divergence the phase detector sees, NaN already means "no loss"). A wall time that is
    not a plausible Unix time (NaN, Inf, before `EARLIEST_WALL_TIME` or more than
    `WALL_TIME_AHEAD` past now: an agent's broken clock or a bug) is replaced by the time of
    decoding, not refused: refusing would lose the whole run of an agent whose clock is wrong,
    while the time only places the sample in the history and its events. Each is counted into
    `nonfinite` by what carried it: "energy", "wall_time", "layer", "site" (values, not rows).
    The layers' `update_sq`, added after the others, is read apart: absent (an agent before it) or
    NaN (a layer it did not say, as a node merging such an agent's) is NaN, an infinite value is
    NaN and counted, and neither touches the rest of its layer's row; a negative one is refused.

    Cost: a collector decodes every frame, so the columns are read as one buffer and the
    common case (all finite, nothing negative or too large) is settled with three checks
    over it; only a frame that fails one of them takes the column-by-column checks, which
    decide what is done and said (the same as checking every column always would).
    """
    lm, sm = frame.layers, frame.sites
    layer_data = (lm.count, lm.mean, lm.m2, lm.grad_dot_before, lm.grad_dot_after)  # LAYER_COLUMNS
    site_data = (sm.count, sm.in_mean, sm.in_m2, sm.out_mean, sm.out_m2, sm.probe_spread)  # SITE_COLUMNS
    nl, ns = n_layers, n_sites
    if {*map(len, layer_data)} != {8 * nl} or {*map(len, site_data)} != {8 * ns}:  # 8: I64, F64
        for prefix, spec, data, n in (
            ("layer", LAYER_COLUMNS, layer_data, nl),
            ("site", SITE_COLUMNS, site_data, ns),
        ):
            for (name, dtype), column in zip(spec, data, strict=True):
                _check_length(f"{prefix}.{name}", len(column), n, dtype, prefix)
    hist = None  # histograms come every few frames; an empty column means "not taken"
    if histogram := lm.histogram:
        _check_length("layer.histogram", len(histogram), nl * (bins + 2), U32, "layer")
        hist = np.frombuffer(histogram, dtype=U32).astype(np.int64).reshape(nl, bins + 2)
    if frame.seq > MAX_SEQ:
        raise WireError("invalid_value", f"frame seq {frame.seq} exceeds {MAX_SEQ}")
    counts = {} if nonfinite is None else nonfinite
    update_sq = _update_sq(frame.seq, lm.update_sq, nl, counts)
    energy = frame.energy if frame.HasField("energy") else math.nan
    if math.isinf(energy):
        counts["energy"] = counts.get("energy", 0) + 1
        if energy < 0:
            energy = math.nan
    wall_time, now = frame.wall_time, time.time()
    if not EARLIEST_WALL_TIME <= wall_time <= now + WALL_TIME_AHEAD:  # NaN fails it too
        counts["wall_time"] = counts.get("wall_time", 0) + 1
        wall_time = now

    # One buffer, its columns in an order that makes each check one reduction over a contiguous
    # slice: [0, m2_end) the m2 columns, [m2_end, floats_end) the other floats, then the counts.
    l_count, l_mean, l_m2, l_before, l_after = layer_data
    s_count, s_in_mean, s_in_m2, s_out_mean, s_out_m2, s_probe = site_data
    floats = (l_m2, s_in_m2, s_out_m2, l_mean, l_before, l_after, s_in_mean, s_out_mean, s_probe)
    raw = np.frombuffer(b"".join((*floats, l_count, s_count)), dtype=I64)
    f = raw.view(F64)
    cuts, m2_end, floats_end = _layout(nl, ns)
    m2, in_m2, out_m2, mean, before, after, in_mean, out_mean, probe = [f[cut] for cut in cuts]
    lc = [raw[floats_end : floats_end + nl], mean, m2, before, after]  # LAYER_COLUMNS order
    sc = [raw[floats_end + nl :], in_mean, in_m2, out_mean, out_m2, probe]  # SITE_COLUMNS order
    finite = np.logical_and.reduce(np.isfinite(f[:floats_end]))
    if not finite:
        _replace_nonfinite(lc, sc, counts)
    if (
        not finite  # the m2 columns may hold NaN now, which a min would return
        or np.maximum.reduce(raw[floats_end:].view(np.uint64), initial=0) > MAX_COUNT  # negative: huge
        or np.minimum.reduce(f[:m2_end], initial=0.0) < 0
    ):
        _check_values(frame.seq, lc, sc)
    return Sample(
        step=frame.step,
        wall_time=wall_time,
        energy=energy,
        layers=LayerStats(*lc, hist, update_sq),
        sites=SiteStats(*sc),
    )


def _update_sq(seq: int, column: bytes, n_layers: int, counts: dict[str, int]) -> np.ndarray | None:
    """The layers' update sums of squares (`decode`): None where the column is absent (NaN)."""
    if not column:
        return None
    _check_length("layer.update_sq", len(column), n_layers, F64, "layer")
    values = np.frombuffer(column, dtype=F64)
    if (values < 0).any():
        raise WireError("invalid_value", f"frame {seq}: column layer.update_sq has negative values")
    if np.isinf(values).any():
        counts["layer"] = counts.get("layer", 0) + int(np.isinf(values).sum())
        values = np.where(np.isinf(values), np.nan, values)
    return values


@functools.lru_cache(maxsize=256)
def _layout(n_layers: int, n_sites: int) -> tuple[tuple[slice, ...], int, int]:
    """`decode`'s float columns in its buffer, as slices, and where the m2 columns and the
    floats end (a stream's sizes never change: worked out once)."""
    ends = list(accumulate((n_layers, n_sites, n_sites, *(n_layers,) * 3, *(n_sites,) * 3), initial=0))
    return tuple(slice(a, b) for a, b in pairwise(ends)), ends[3], ends[-1]


def _check_length(column: str, size: int, n: int, dtype: np.dtype, prefix: str) -> None:
    if size != n * dtype.itemsize:
        raise WireError(
            "length_mismatch",
            f"column {column} holds {size} bytes; the hello declares {n} {prefix}s "
            f"({n * dtype.itemsize} bytes of {dtype.name})",
        )


def _replace_nonfinite(lc: list[np.ndarray], sc: list[np.ndarray], counts: dict[str, int]) -> None:
    """NaN out the rows with a non-finite float, read a non-finite probe as "not probed", count them.

    `lc` and `sc` are the columns in LAYER_COLUMNS and SITE_COLUMNS order, replaced in place.
    """
    for prefix, cols, spec in (("layer", lc, LAYER_COLUMNS), ("site", sc, SITE_COLUMNS)):
        probe = len(cols) - 1 if prefix == "site" else None
        floats = [i for i, (name, dtype) in enumerate(spec) if dtype == F64 and i != probe]
        if probe is not None and not np.isfinite(cols[probe]).all():
            counts[prefix] = counts.get(prefix, 0) + int((~np.isfinite(cols[probe])).sum())
            cols[probe] = np.where(np.isfinite(cols[probe]), cols[probe], -1.0)
        bad = ~np.isfinite(np.stack([cols[i] for i in floats]))
        if bad.any():
            counts[prefix] = counts.get(prefix, 0) + int(bad.sum())
            rows = bad.any(axis=0)
            for i in floats:
                cols[i] = np.where(rows, np.nan, cols[i])


def _check_values(seq: int, lc: list[np.ndarray], sc: list[np.ndarray]) -> None:
    """Refuse negative counts and M2s and oversized counts, naming the first column at fault."""
    named = [
        *((f"layer.{name}", values) for (name, _), values in zip(LAYER_COLUMNS, lc, strict=True)),
        *((f"site.{name}", values) for (name, _), values in zip(SITE_COLUMNS, sc, strict=True)),
    ]
    for name, values in named:
        if name.endswith(("count", "m2")) and (values < 0).any():
            raise WireError("invalid_value", f"frame {seq}: column {name} has negative values")
        if name.endswith("count") and (values > MAX_COUNT).any():
            raise WireError("invalid_value", f"frame {seq}: column {name} exceeds {MAX_COUNT} values")
